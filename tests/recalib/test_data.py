"""``bnfold.data``: the one reader of ``--data`` specs, shared by recalibrate and verify."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli.app import app
from bnfold.data import (
    as_numpy,
    is_function_spec,
    load_data_spec,
    normalise_batch,
    read_array_file,
)
from bnfold.errors import BadInputError

from .test_cli import _onnx_model

runner = CliRunner()


def _module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_array_files_and_folders(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10.0).reshape(5, 2))
    np.savez(tmp_path / "b.npz", x=np.ones((3, 2)), y=np.zeros((4, 1)))
    batches = list(load_data_spec(str(tmp_path), batch_size=2))
    # a.npy: 5 samples in batches of 2; b.npz: dict batches cut to the shortest array (3)
    assert [b.shape[0] for b in batches[:3]] == [2, 2, 1]
    assert batches[3].keys() == {"x", "y"} and batches[3]["y"].shape == (2, 1)
    assert len(batches) == 5
    assert next(iter(load_data_spec(str(tmp_path / "a.npy"), batch_size=5)))[4, 1] == 9.0
    # one-array npz: the stack of samples itself
    np.savez(tmp_path / "one.npz", np.ones((4, 2)))
    assert isinstance(read_array_file(tmp_path / "one.npz"), dict)
    assert [b.shape for b in load_data_spec(str(tmp_path / "one.npz"), batch_size=3)] == [
        (3, 2),
        (1, 2),
    ]


def test_one_line_errors(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_array_file(tmp_path / "nope.npy")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="cannot read data file"):
        read_array_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(BadInputError, match="holds no arrays"):
        read_array_file(tmp_path / "empty.npz")
    with pytest.raises(BadInputError, match="neither"):
        load_data_spec("plain-word")
    with pytest.raises(BadInputError, match="cannot import"):
        load_data_spec("no_such_module_xyz:f")
    with pytest.raises(BadInputError, match="positive"):
        load_data_spec(str(tmp_path / "empty.npz"), batch_size=0)


def test_function_spec_and_batch_types(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "spec_mod_a", "def f():\n    return 3\n")
    with pytest.raises(BadInputError, match="not an iterable"):
        load_data_spec("spec_mod_a:f")
    with pytest.raises(BadInputError, match="no function"):
        load_data_spec("spec_mod_a:g")
    # a path that exists is a path even when it contains a colon
    odd = tmp_path / "x:y"
    odd.mkdir()
    assert not is_function_spec(str(odd)) and is_function_spec("pkg.mod:fn")
    b = normalise_batch((np.ones(2), 1))
    assert isinstance(b[0], torch.Tensor) and b[1] == 1
    assert as_numpy(torch.ones(2)).dtype == np.float32


def test_verify_cli_reads_module_function_data(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    _onnx_model(model)
    _module(
        tmp_path,
        monkeypatch,
        "verify_data_mod",
        "import numpy as np\n"
        "def batches():\n"
        "    g = np.random.default_rng(0)\n"
        "    return [g.normal(size=(4, 2, 3)).astype(np.float32) for _ in range(3)]\n",
    )
    res = runner.invoke(
        app, ["verify", str(model), str(model), "--data", "verify_data_mod:batches", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert "3 batch(es)" in res.output
    res = runner.invoke(app, ["verify", str(model), str(model), "--data", "verify_data_mod:nope"])
    assert res.exit_code == 2 and "no function 'nope'" in res.output
    assert len(res.output.strip().splitlines()) == 1
