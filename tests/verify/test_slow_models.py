"""Verification of folded reference models end to end (slow: exports real networks)."""

from __future__ import annotations

import json

import onnx
import pytest
import typer
from typer.testing import CliRunner
from verify_models import export_onnx

import bnfold
from bnfold.cli import verify as verify_cmd
from bnfold.models import REGISTRY, build
from bnfold.verification import verify

pytestmark = pytest.mark.slow


def _export(name: str) -> onnx.ModelProto:
    return export_onnx(*build(name))


def test_quick_folded_resnet_mini_cli_round_trip(tmp_path):
    """bnfold fold's report localises a broken fold of a real network through the CLI."""
    original = _export("resnet-mini")
    folded, report = bnfold.fold(original)
    assert len(report.folded) >= 5
    onnx.save(original, tmp_path / "o.onnx")
    onnx.save(folded, tmp_path / "f.onnx")
    (tmp_path / "fold.json").write_text(report.to_json())
    # Break the fold of the middle site.
    site = report.folded[len(report.folded) // 2]
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    weight = next(n.input[1] for n in broken.graph.node if n.name == site.target)
    for t in broken.graph.initializer:
        if t.name == weight:
            arr = onnx.numpy_helper.to_array(t) * 1.001
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype("float32"), weight))
    onnx.save(broken, tmp_path / "b.onnx")

    app = typer.Typer()
    app.command("verify")(verify_cmd.verify)
    app.command("noop")(lambda: None)
    cli = CliRunner()
    ok = cli.invoke(app, ["verify", str(tmp_path / "o.onnx"), str(tmp_path / "f.onnx"), "-q"])
    assert ok.exit_code == 0, ok.output
    bad = cli.invoke(
        app,
        [
            "verify",
            str(tmp_path / "o.onnx"),
            str(tmp_path / "b.onnx"),
            "--fold-report",
            str(tmp_path / "fold.json"),
            "--json",
            str(tmp_path / "r.json"),
            "--batches",
            "2",
        ],
    )
    assert bad.exit_code == 1, bad.output
    assert json.loads((tmp_path / "r.json").read_text())["localisation"]["bn"] == site.bn


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if not s.heavy])
def test_every_folded_reference_model_verifies(name):
    original = _export(name)
    folded, _ = bnfold.fold(original)
    report = verify(original, folded, num_batches=4)
    assert report.passed, str(report)
    module, _ = build(name)
    # And against the float64 PyTorch module itself.
    assert verify(module, folded, num_batches=2).passed


def test_resnet50_broken_fold_is_localised():
    """On a ResNet-50-sized network, 1e-3 on one folded weight fails and is named, with the
    localisation scanning 53 sites in bounded chunks."""
    original = _export("resnet50")
    folded, report = bnfold.fold(original)
    assert verify(original, folded, num_batches=2).passed
    site = report.folded[len(report.folded) // 2]
    weight = next(n.input[1] for n in folded.graph.node if n.name == site.target)
    for t in folded.graph.initializer:
        if t.name == weight:
            arr = onnx.numpy_helper.to_array(t) * 1.001
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype("float32"), weight))
    result = verify(original, folded, fold_report=report, localise_chunk=16)
    assert result.verdict == "fail"
    assert result.localisation.bn == site.bn
