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
from bnfold.errors import BadInputError


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


def test_timm_shorthand_builds_without_download_and_declares_its_input() -> None:
    pytest.importorskip("timm")
    from bnfold.inputspec import example_inputs
    from bnfold.sources import ModelSpec, load_source

    loaded = load_source(ModelSpec("timm:resnet18", factory_args={"num_classes": 7}))
    assert loaded.input_size == (3, 224, 224) and loaded.label == "resnet18"
    (x,) = example_inputs(loaded)
    assert tuple(x.shape) == (1, 3, 224, 224)
    assert loaded.model.get_classifier().out_features == 7
    with pytest.raises(BadInputError, match="timm has no model"):
        load_source(ModelSpec("timm:no_such_net"))


def test_torchvision_shorthand_and_unknown_names() -> None:
    pytest.importorskip("torchvision")
    from bnfold.sources import ModelSpec, load_source

    loaded = load_source(ModelSpec("torchvision:resnet18", factory_args={"num_classes": 3}))
    assert loaded.model.fc.out_features == 3 and loaded.input_size is None
    with pytest.raises(BadInputError, match="torchvision has no model 'resnet19'"):
        load_source(ModelSpec("torchvision:resnet19"))
    with pytest.raises(BadInputError, match="no factory 'resnet19'"):
        load_source(ModelSpec("torchvision.models:resnet19"))
