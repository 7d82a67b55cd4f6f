"""Verification on onnxruntime's CUDA execution provider (GPU machines only).

Skipped, with the reason, where onnxruntime has no CUDAExecutionProvider (the plain
``onnxruntime`` wheel; ``pip install 'bnfold[cuda]'`` brings ``onnxruntime-gpu``) or where the
provider is installed but cannot start a session (no GPU or no CUDA libraries).
"""

from __future__ import annotations

import functools

import onnx
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner
from verify_models import conv_bn_chain, export_onnx, perturb

import bnfold
from bnfold.cli import verify as verify_cmd
from bnfold.models import build
from bnfold.verification import verify


@functools.cache
def _cuda_unavailable() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            "onnxruntime has no CUDAExecutionProvider here (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
        )
    model = conv_bn_chain()
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if "CUDAExecutionProvider" not in session.get_providers():
        return "CUDAExecutionProvider is installed but cannot start (no GPU or CUDA libraries)"
    return None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_cuda_unavailable() is not None, reason=str(_cuda_unavailable())),
]


def _export(name: str) -> onnx.ModelProto:
    return export_onnx(*build(name))


@pytest.mark.parametrize("name", ["resnet-mini", "mobilenet-mini", "decoder"])
def test_folded_reference_model_passes_on_cuda(name):
    original = _export(name)
    folded, report = bnfold.fold(original)
    assert report.folded
    result = verify(original, folded, providers=("cpu", "cuda"), num_batches=4)
    cpu, cuda = result.providers
    assert cuda.verdict == "pass", str(result)
    assert cuda.runtime == "CUDAExecutionProvider"
    assert cpu.verdict == "pass"
    assert result.passed


def test_broken_fold_fails_on_cuda_and_is_localised():
    original = conv_bn_chain()
    folded, report = bnfold.fold(original)
    result = verify(
        original, perturb(folded, "conv2", 1e-3), providers=("cuda",), fold_report=report
    )
    assert result.providers[0].verdict == "fail"
    assert result.localisation is not None and result.localisation.bn == "bn2"


def test_cli_cuda_exit_0(tmp_path):
    original = _export("resnet-mini")
    folded, _ = bnfold.fold(original)
    onnx.save(original, tmp_path / "o.onnx")
    onnx.save(folded, tmp_path / "f.onnx")
    app = typer.Typer()
    app.command("verify")(verify_cmd.verify)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(
        app, ["verify", str(tmp_path / "o.onnx"), str(tmp_path / "f.onnx"), "--providers", "cuda"]
    )
    assert res.exit_code == 0, res.output
