"""Reference models exported with their BatchNorms kept fold to the expected BN count."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnxfold_util import bn_count, check_fold, feeds, max_rel_error, run

from bnfold.models import REGISTRY, build, names
from bnfold.onnx_io import load_onnx_info
from bnfold.onnxfold import fold_file

EXPORTERS = ("dynamo", "torchscript")


def export(name: str, exporter: str, path: Path) -> onnx.ModelProto:
    """Export a registered model keeping every BN (no exporter-side folding)."""
    module, example = build(name)
    return export_module(module, example, exporter, path)


def export_module(
    module: torch.nn.Module, example: torch.Tensor, exporter: str, path: Path
) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (example,), str(path), dynamo=True, optimize=False)
        else:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, do_constant_folding=False
            )
    return onnx.load(str(path))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", names(include_heavy=False))
def test_reference_model_folds(tmp_path, name, exporter):
    module, example = build(name)
    m = export_module(module, example, exporter, tmp_path / f"{name}.onnx")
    assert bn_count(m) > 0
    inputs = {m.graph.input[0].name: example.numpy()}
    try:
        expected = run(m, inputs)
    except Exception:
        # The dynamo exporter writes Conv3d's zero bias with shape (C, 2), which onnxruntime
        # rejects; the folded model has a proper bias, so it is held to torch's outputs.
        with torch.no_grad():
            expected = [module(example).numpy()]
    _, report = check_fold(m, left=REGISTRY[name].unfoldable, reference=(inputs, expected))
    assert len(report.skipped) == REGISTRY[name].unfoldable


def test_external_data_round_trip(tmp_path):
    m = export("resnet-mini", "torchscript", tmp_path / "plain.onnx")
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    ext = onnx.ModelProto()
    ext.CopyFrom(m)  # save_model(save_as_external_data=True) converts the model it is given
    onnx.save_model(
        ext, str(src), save_as_external_data=True, location="weights.bin", size_threshold=256
    )
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    report = fold_file(src, dst)
    assert len(report.folded) == bn_count(m)
    assert (dst.parent / "folded.onnx.data").is_file()
    loaded = load_onnx_info(dst)
    assert loaded.external_data
    onnx.checker.check_model(str(dst), full_check=True)
    inputs = feeds(m)
    assert max_rel_error(run(m, inputs), run(loaded.model, inputs)) <= 1e-5
    # forcing a single file works too
    single = tmp_path / "out" / "single.onnx"
    fold_file(src, single, external_data=False)
    assert not load_onnx_info(single).external_data


@pytest.mark.slow
@pytest.mark.parametrize(
    "exporter", [pytest.param("torchscript", id="quick-torchscript"), "dynamo"]
)
def test_resnet50_folds_every_bn(tmp_path, exporter):
    """The ~100 MB ResNet-50 of the benchmark folds completely, through files, and matches."""
    module, example = build("resnet50")
    src = tmp_path / "resnet50.onnx"
    m = export_module(module, example, exporter, src)
    dst = tmp_path / "folded.onnx"
    report = fold_file(src, dst)
    assert len(report.folded) == bn_count(m) == 53
    folded = onnx.load(str(dst))
    assert bn_count(folded) == 0
    inputs = {m.graph.input[0].name: example.numpy()}
    assert max_rel_error(run(m, inputs), run(folded, inputs)) <= 1e-5
