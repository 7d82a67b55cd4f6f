"""Loading model files and ``fold_file``: formats, refusals, and atomic output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchfold_util import randomise, rel_err

from bnfold import BadInputError, UnsupportedModelError
from bnfold.torchfold import count_batchnorms, fold_file, load_torch


@pytest.fixture
def small() -> tuple[nn.Module, torch.Tensor]:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    return model, torch.randn(2, 3, 6, 6)


def test_load_exported_program_with_its_example(tmp_path: Path, small) -> None:
    model, x = small
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    program, example = load_torch(str(tmp_path / "m.pt2"))
    assert isinstance(program, torch.export.ExportedProgram)
    assert example is not None and torch.equal(example[0], x)


def test_load_reference_name_builds_model_and_input() -> None:
    model, example = load_torch("mlp")
    assert isinstance(model, nn.Module) and not model.training
    assert example is not None and model(*example).shape[0] == example[0].shape[0]


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(BadInputError, match="resnet-mini"):
        load_torch("no-such-model")


def test_pickle_needs_opt_in_and_state_dict_points_to_factory(tmp_path: Path, small) -> None:
    model, x = small
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(BadInputError, match="allow_pickle=True"):
        load_torch(str(tmp_path / "whole.pt"))
    loaded, _ = load_torch(str(tmp_path / "whole.pt"), allow_pickle=True)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(BadInputError, match="state_dict"):
        load_torch(str(tmp_path / "weights.pt"))


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(BadInputError, match="not a PyTorch file"):
        load_torch(str(tmp_path / "junk.pt"))


def test_torchscript_loads_but_does_not_fold(tmp_path: Path, small) -> None:
    model, x = small
    torch.jit.save(torch.jit.trace(model, (x,)), str(tmp_path / "m.ts"))
    loaded, _ = load_torch(str(tmp_path / "m.ts"))
    assert isinstance(loaded, torch.jit.ScriptModule)
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        fold_file(str(tmp_path / "m.ts"), tmp_path / "out.pt2")
    assert not (tmp_path / "out.pt2").exists()


def test_fold_file_writes_a_folded_program(tmp_path: Path, small) -> None:
    model, x = small
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    report = fold_file(str(src), tmp_path / "folded.pt2")
    out = torch.export.load(str(tmp_path / "folded.pt2"))
    assert count_batchnorms(out) == 0 and len(report.folded) == 1
    assert report.model == str(src)
    assert rel_err(model(x), out.module()(x)) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.pt2", "m.pt2"]


def test_fold_file_refuses_overwriting_its_input(tmp_path: Path, small) -> None:
    model, x = small
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    before = src.read_bytes()
    with pytest.raises(BadInputError, match="input"):
        fold_file(str(src), src)
    assert src.read_bytes() == before


def test_fold_file_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(BadInputError):
        fold_file(str(tmp_path / "missing.pt2"), tmp_path / "out.pt2")
    with pytest.raises(BadInputError, match="does not exist"):
        fold_file("mlp", tmp_path / "no" / "out.pt2")
    assert list(tmp_path.iterdir()) == []


def test_fold_file_from_a_reference_name(tmp_path: Path) -> None:
    report = fold_file("flatten-head", tmp_path / "f.pt2", direction="forward")
    assert [d.direction.value for d in report.folded] == ["forward"]
    assert count_batchnorms(torch.export.load(str(tmp_path / "f.pt2"))) == 0
