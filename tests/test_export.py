"""``bnfold export`` / ``bnfold.export``: the whole path, its report and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import bnfold
from bnfold.cli.app import app
from bnfold.cli.common import EXIT_BAD_INPUT, EXIT_FAILED
from bnfold.models import build


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_export_api_writes_a_verified_bn_free_model(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = bnfold.export("mobilenet-mini", out, progress=False)
    assert result.passed and result.output == out and out.exists()
    model = onnx.load(out)
    assert _bn_count(model) == 0 == result.batchnorms_left
    assert len(result.torch_report.folded) == len(result.torch_report.decisions) > 0
    module, x = build("mobilenet-mini")
    with torch.no_grad():
        ref = module.double()(x.double()).numpy()
    got = _run(out, x)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # the batch dimension stays dynamic
    assert _run(out, torch.randn(5, *x.shape[1:])).shape[0] == 5
    report = result.to_dict()
    assert report["passed"] is True and report["verify"] is not None


def test_export_keeps_an_unfoldable_bn_and_says_why(tmp_path: Path) -> None:
    result = bnfold.export("bn-after-act", tmp_path / "m.onnx", progress=False)
    assert result.passed
    (kept,) = result.torch_report.skipped
    assert kept.code is bnfold.SkipCode.PADDING
    assert result.batchnorms_left == 1


def test_export_in_memory_module_needs_example_inputs(tmp_path: Path) -> None:
    module, x = build("conv1d")
    with pytest.raises(bnfold.BadInputError, match="example_inputs"):
        bnfold.export(module, tmp_path / "m.onnx", progress=False)
    result = bnfold.export(module, tmp_path / "m.onnx", example_inputs=x, progress=False)
    assert result.passed and _bn_count(onnx.load(tmp_path / "m.onnx")) == 0


def test_failed_verification_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    # rtol=atol=0 demands bit-identical outputs, which no float32 fold gives
    result = bnfold.export("resnet-mini", out, rtol=0.0, atol=0.0, progress=False)
    assert not result.passed
    assert result.output is None and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_export_without_arguments_uses_the_default_model(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold.cli.app", "export", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "bnfold-out" / "resnet-mini.onnx"
    assert out.exists() and _bn_count(onnx.load(out)) == 0
    assert "PASS" in proc.stdout


def test_cli_export_json_and_failure_exit_code(tmp_path: Path) -> None:
    runner = CliRunner()
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    res = runner.invoke(
        app, ["export", "mlp", "-o", str(out), "--json", str(rep), "--rtol", "0", "--atol", "0"]
    )
    assert res.exit_code == EXIT_FAILED
    assert not out.exists()
    data = json.loads(rep.read_text())
    assert data["passed"] is False and data["torch_fold"]["summary"]["folded"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-model"], "known"),
        (["model.onnx"], "already ONNX"),
        (["resnet-mini", "-o", "missing-dir/m.onnx"], "does not exist"),
        (["resnet-mini", "--direction", "sideways"], "direction"),
    ],
)
def test_cli_export_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = runner.invoke(app, ["export", "-q", *args])
    finally:
        os.chdir(cwd)
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not any(p.suffix == ".onnx" for p in tmp_path.rglob("*"))


def test_export_recalibrates_a_copy_then_folds(tmp_path: Path) -> None:
    module, x = build("conv1d")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, *x.shape[1:], generator=gen) * 3 + 1 for _ in range(4)]
    out = tmp_path / "m.onnx"
    result = bnfold.export(module, out, example_inputs=x, data=data, progress=False)
    assert result.passed and result.recalibration is not None
    assert len(result.recalibration.updated) == 2
    for k, v in module.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    expected = bnfold.recalibrate(module, data, progress=False, inplace=False).model
    with torch.no_grad():
        ref = expected.double()(x.double()).numpy()
        stale = module.double()(x.double()).numpy()
    got = _run(out, x)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-5 * scale
    assert np.abs(got - stale).max() > 1e-3 * scale
