"""The benchmark suite: peers that are missing or broken are reported, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bench import common, onnx_peers
from bnfold.models import build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlp_coverage():
    model, x = build("mlp")
    limit, _ = build("mlp", bn=False)
    return onnx_peers.coverage("mlp", model, x, limit, repeat=1, latency_rounds=1)


def test_bnfold_row_reports_every_bn_and_its_error(mlp_coverage):
    row = next(t for t in mlp_coverage["tools"] if t["tool"] == "bnfold")
    assert row["status"] == "ok"
    assert row["bn_found"] == 3
    assert row["bn_folded"] + row["bn_left"] == 3
    assert row["bn_left"] == sum(row["reasons"].values())
    assert row["max_rel_err"] < 1e-5
    for key in ("pass_ratio", "ort_disable_ratio", "ort_enable_ratio"):
        assert row[key] > 0
    assert mlp_coverage["latency"]["no-BN (limit)"]["ort_enable_ms"] > 0


def test_missing_peer_is_reported_not_installed(monkeypatch):
    real = common.installed
    monkeypatch.setattr(
        common, "installed", lambda m, d=None: None if m == "onnxoptimizer" else real(m, d)
    )
    model, x = build("conv1d")
    limit, _ = build("conv1d", bn=False)
    result = onnx_peers.coverage("conv1d", model, x, limit, repeat=1, latency_rounds=1)
    row = next(t for t in result["tools"] if t["tool"].startswith("onnxoptimizer"))
    assert row["status"] == "not installed"


def test_peer_that_raises_is_recorded(monkeypatch):
    def broken() -> onnx_peers.Pass:
        def run(m: onnx.ModelProto) -> onnx.ModelProto:
            raise RuntimeError("boom")

        return run

    monkeypatch.setattr(onnx_peers, "PEERS", [onnx_peers.Peer("broken", "onnx", "onnx", broken)])
    model, x = build("conv1d")
    limit, _ = build("conv1d", bn=False)
    result = onnx_peers.coverage("conv1d", model, x, limit, repeat=1, latency_rounds=1)
    assert result["tools"][0]["status"].startswith("raised RuntimeError")


def test_invalid_output_is_counted_invalid():
    model, x = build("conv1d")
    src = common.export_onnx_keep_bn(model, x)
    del src.graph.initializer[0]  # a weight nobody provides: checker or onnxruntime refuses
    status, out = onnx_peers.validity(src, x.numpy())
    assert status.startswith("invalid")
    assert out is None


@pytest.mark.slow
def test_suite_quick_smoke(tmp_path):
    """`bench/run.py --quick`: one small model through every section, tables written.

    The digits demonstration has its own (default-suite) test, so the smoke leaves it out to
    stay well under a minute.
    """
    sections = "onnx,torch,recalibration,verify,cuda"
    script = str(REPO / "bench" / "run.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--sections", sections, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "suite.json").read_text())
    assert not results.get("failed")
    (model,) = results["onnx"]
    bnfold_row = next(t for t in model["tools"] if t["tool"] == "bnfold")
    assert (bnfold_row["bn_folded"], bnfold_row["bn_left"]) == (9, 0)
    assert all(t["status"] for t in model["tools"])
    assert results["torch"]["zoo"][0]["bnfold_left"] == 0
    assert any(r["tool"] == "bnfold exact" for r in results["recalibration"]["errors"])
    assert results["verify"]["passed"] is True
    assert "status" in results["cuda"]
    md = (tmp_path / "suite.md").read_text()
    assert "### ONNX folding" in md and "### PyTorch folding" in md
