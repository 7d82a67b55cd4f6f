"""torchvision and timm models through the factory + weights route (small inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli.app import app


def _randomise_bn(module: torch.nn.Module) -> None:
    """Statistics far from the init values, so that a fold that ignores them shows."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.mark.slow
def test_quick_torchvision_resnet18_from_factory_and_weights(tmp_path: Path) -> None:
    models = pytest.importorskip("torchvision.models")
    module = models.resnet18(weights=None).eval()
    _randomise_bn(module)
    weights = tmp_path / "resnet18.pt"
    torch.save(module.state_dict(), weights)
    out, report = tmp_path / "r18.onnx", tmp_path / "r18.json"
    res = CliRunner().invoke(
        app,
        [
            "export",
            "torchvision.models:resnet18",
            "--weights",
            str(weights),
            "--input-shape",
            "1x3x64x64",
            "-o",
            str(out),
            "--json",
            str(report),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "x floor" in res.output and "fused" in res.output
    model = onnx.load(out)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = module.double()(x.double()).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
