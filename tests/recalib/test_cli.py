"""``bnfold recalibrate`` end to end: data specs, outputs, one-line errors."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from bnfold.cli.app import app
from bnfold.models import build

from .test_onnx import _tiny_bn_model

runner = CliRunner()


def _onnx_model(path) -> None:
    onnx.save(_tiny_bn_model(), path)


def test_onnx_from_npy_folder_with_json(tmp_path, oracle, rel_err):
    src = tmp_path / "m.onnx"
    _onnx_model(src)
    folder = tmp_path / "data"
    folder.mkdir()
    g = np.random.default_rng(1)
    arrays = [g.normal(3.0, 2.0, size=(n, 2, 3)) for n in (9, 4)]
    for i, a in enumerate(arrays):
        np.save(folder / f"{i}.npy", a)
    out, js = tmp_path / "out.onnx", tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "recalibrate",
            str(src),
            "--data",
            str(folder),
            "-o",
            str(out),
            "--json",
            str(js),
            "--batch-size",
            "5",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    mean, var = oracle(np.concatenate(arrays).astype(np.float32))
    assert rel_err(inits["m"], mean) <= 1e-6 and rel_err(inits["v"], var) <= 1e-6
    assert '"updated"' in js.read_text()


def test_torch_registry_model_to_state_dict_with_module_function(tmp_path, monkeypatch):
    mod = tmp_path / "mydata.py"
    mod.write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(6, 32, generator=g), 0) for _ in range(3)]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "mlp.pt"
    res = runner.invoke(
        app,
        [
            "recalibrate",
            "mlp",
            "--data",
            "mydata:batches",
            "-o",
            str(out),
            "--num-samples",
            "12",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    state = torch.load(out)
    model, _ = build("mlp")
    before = model.state_dict()
    changed = [k for k in state if "running_var" in k and not torch.equal(state[k], before[k])]
    assert len(changed) == 3
    sys.modules.pop("mydata", None)


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    src = tmp_path / "m.onnx"
    _onnx_model(src)
    np.save(tmp_path / "d.npy", np.zeros((0, 2, 3), np.float32))
    cases = [
        [
            "recalibrate",
            str(src),
            "--data",
            str(tmp_path / "missing.npy"),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        ["recalibrate", str(src), "--data", "nosuchmodule_xyz:f", "-o", str(tmp_path / "o.onnx")],
        [
            "recalibrate",
            str(src),
            "--data",
            str(tmp_path / "d.npy"),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        ["recalibrate", str(src), "--data", str(tmp_path / "d.npy"), "-o", str(src)],
    ]
    for args in cases:
        res = runner.invoke(app, [*args, "--no-progress"])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "o.onnx").exists()
