"""``bnfold fold --allow-pickle``: a pickled whole module is refused unless the flag is given."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchfold_util import randomise
from typer.testing import CliRunner

from bnfold.cli.app import app

runner = CliRunner()


def _pickled(tmp_path: Path) -> Path:
    path = tmp_path / "whole.pt"
    torch.save(randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), str(path))
    return path


def test_pickled_module_is_refused_without_the_flag(tmp_path: Path) -> None:
    out = tmp_path / "out.pt2"
    result = runner.invoke(app, ["fold", str(_pickled(tmp_path)), "-o", str(out)])
    assert result.exit_code == 2
    assert "is a pickled model" in result.output and "--allow-pickle" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_allow_pickle_reaches_the_loader(tmp_path: Path) -> None:
    """With the flag the file is unpickled; a bare module stores no example input to export
    the folded model with, which is reported in one line and nothing is written."""
    out = tmp_path / "out.pt2"
    args = ["fold", str(_pickled(tmp_path)), "-o", str(out), "--allow-pickle"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "example inputs" in result.output and "is a pickled model" not in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_help_warns_that_unpickling_runs_code() -> None:
    result = runner.invoke(app, ["fold", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--allow-pickle" in result.output and "arbitrary code" in result.output
