"""The real-data demonstration, shortened: folding and export must not move one prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (test extra)")

from bench import demo_digits


@pytest.fixture(scope="module")
def result():
    return demo_digits.run_demo(None, epochs=1, latency=False, plot=False)


def test_fold_and_export_keep_every_prediction(result):
    assert demo_digits.check_identical(result) == []
    export_rows = [r for r in result.rows if "bnfold.export" in r.state]
    fold_rows = [r for r in result.rows if r.state == "+ bnfold.fold (PyTorch)"]
    assert len(export_rows) == 2 and len(fold_rows) == 1
    for r in export_rows + fold_rows:
        assert r.changed == 0
        assert r.max_rel is not None and r.max_rel < 1e-5
        assert r.accuracy == result.row(r.versus).accuracy


def test_every_bn_folds_including_the_one_after_the_activation(result):
    assert result.fold["batchnorms"] == 4
    assert result.fold["folded"] == 4
    assert result.fold["folded_by_direction"] == {"backward": 3, "forward": 1}
    assert result.fold["onnx_batchnorms_left"] == 0


def test_training_worked_and_recalibration_repairs_the_input_shift(result):
    assert result.rows[0].accuracy > 0.85
    stale = next(r for r in result.rows if r.state.startswith("input shift") and "stale" in r.state)
    fresh = next(
        r for r in result.rows if r.state.startswith("input shift") and "bnfold" in r.state
    )
    assert fresh.accuracy > stale.accuracy + 0.03


def test_outputs_are_written(result, tmp_path: Path):
    demo_digits.write_outputs(result, tmp_path, plot=False)
    assert (tmp_path / "accuracy.md").read_text().count("\n|") >= len(result.rows)
    assert (tmp_path / "accuracy.json").stat().st_size > 0
