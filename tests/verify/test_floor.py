"""The noise-floor verdict: the fold is judged by the unfolded model's own error."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from verify_models import export_onnx, perturb

import bnfold
from bnfold.models import build
from bnfold.verification.compare import OutputStats
from bnfold.verification.floor import FLOOR_FACTOR, floor_verdict, ulp_at


def _stats(max_abs: float, ref_max: float = 1.0, dtype: str = "float32") -> OutputStats:
    return OutputStats(
        output="y",
        dtype=dtype,
        shape=(1,),
        elements=1,
        mismatches=0,
        max_abs=max_abs,
        max_rel=0.0,
        max_ulp=0.0,
        cosine=1.0,
        sqnr_db=100.0,
        p50_abs=0.0,
        p99_abs=0.0,
        rtol=0.0,
        atol=0.0,
        passed=True,
        ref_max_abs=ref_max,
    )


def test_the_rule_is_a_factor_of_the_floor_plus_a_few_ulps() -> None:
    ulp = ulp_at(1.0, "float32")
    assert ulp == 2.0**-23
    ok = floor_verdict(_stats(3.9e-6), _stats(1e-6))
    assert ok.passed and ok.factor == pytest.approx(3.9)
    bad = floor_verdict(_stats(FLOOR_FACTOR * 1e-6 + 5 * ulp), _stats(1e-6))
    assert not bad.passed and not bad.exporter_problem
    exact = floor_verdict(_stats(2 * ulp), _stats(0.0))
    assert exact.passed and math.isinf(exact.factor)
    far = floor_verdict(_stats(0.05), _stats(0.05))
    assert far.passed and far.exporter_problem
    assert ulp_at(1.0, "float16") == 2.0**-10 and ulp_at(1.0, "bfloat16") == 2.0**-7


@pytest.fixture(scope="module")
def unfolded_and_folded() -> tuple:
    module, x = build("resnet-mini", seed=1)
    unfolded = export_onnx(module, x)
    folded, report = bnfold.fold(unfolded)
    assert len(report.folded) == 9
    return module, x, unfolded, folded, report


def test_a_correct_fold_passes_within_the_floor(unfolded_and_folded) -> None:
    module, x, unfolded, folded, _ = unfolded_and_folded
    report = bnfold.verify(module, folded, inputs=x, baseline=unfolded)
    assert report.passed and report.rule == "floor"
    (stats,) = report.providers[0].outputs
    assert stats.floor is not None and stats.floor.floor > 0
    assert stats.floor.error <= stats.floor.bound and not report.exporter_problems
    data = report.to_dict()["providers"][0]["outputs"][0]["floor"]
    assert data["allowed_factor"] == FLOOR_FACTOR and data["passed"] is True


def test_every_fold_off_by_1e3_in_one_weight_fails(unfolded_and_folded) -> None:
    module, x, unfolded, folded, report = unfolded_and_folded
    targets = sorted({d.target for d in report.folded})
    assert targets
    for target in targets:
        broken = perturb(folded, target, 1e-3)
        result = bnfold.verify(module, broken, inputs=x, baseline=unfolded)
        (stats,) = result.providers[0].outputs
        assert not result.passed, target
        assert stats.floor is not None and stats.floor.factor > FLOOR_FACTOR, target


def test_explicit_tolerances_replace_the_floor(unfolded_and_folded) -> None:
    module, x, unfolded, folded, _ = unfolded_and_folded
    report = bnfold.verify(module, folded, inputs=x, baseline=unfolded, rtol=0.0, atol=0.0)
    assert report.rule == "tolerance" and not report.passed
    assert report.providers[0].outputs[0].floor is None


def test_a_far_off_unfolded_model_is_an_exporter_problem(unfolded_and_folded) -> None:
    module, x, unfolded, _, _ = unfolded_and_folded
    # an "exporter" that got the first conv 10% wrong: the floor is far off, not the fold
    wrong = perturb(unfolded, unfolded.graph.node[0].name, 0.1)
    report = bnfold.verify(module, wrong, inputs=x, baseline=wrong)
    assert report.exporter_problems == ["cpu/logits"]
    assert any("exporter" in n for n in report.notes)


def test_cli_verify_takes_a_baseline(tmp_path, unfolded_and_folded) -> None:
    from typer.testing import CliRunner

    from bnfold.cli.app import app

    _, x, unfolded, folded, report = unfolded_and_folded
    paths = {n: tmp_path / f"{n}.onnx" for n in ("unfolded", "folded", "broken")}
    onnx.save(unfolded, paths["unfolded"])
    onnx.save(folded, paths["folded"])
    target = report.folded[0].target
    onnx.save(perturb(folded, target, 1e-3), paths["broken"])
    np.save(tmp_path / "x.npy", x.numpy())
    runner = CliRunner()
    base = ["--baseline", str(paths["unfolded"]), "--data", str(tmp_path / "x.npy"), "-q"]
    ok = runner.invoke(app, ["verify", str(paths["unfolded"]), str(paths["folded"]), *base])
    assert ok.exit_code == 0, ok.output
    assert "x floor" in ok.output and "PASS" in ok.output
    bad = runner.invoke(app, ["verify", str(paths["unfolded"]), str(paths["broken"]), *base])
    assert bad.exit_code == 1, bad.output
