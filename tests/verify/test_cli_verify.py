"""``bnfold verify`` on the command line: table, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner
from verify_models import perturb

from bnfold.cli import verify as verify_cmd
from bnfold.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PROVIDER

app = typer.Typer(pretty_exceptions_enable=False)
app.command("verify")(verify_cmd.verify)
# A second command keeps "verify" a subcommand, as in the bnfold app.
app.command("noop")(lambda: None)

runner = CliRunner()


@pytest.fixture
def files(tmp_path, chain, folded_chain):
    folded, report = folded_chain
    paths = {
        "orig": tmp_path / "orig.onnx",
        "folded": tmp_path / "folded.onnx",
        "broken": tmp_path / "broken.onnx",
        "report": tmp_path / "fold.json",
    }
    onnx.save(chain, paths["orig"])
    onnx.save(folded, paths["folded"])
    onnx.save(perturb(folded, "conv1", 1e-3), paths["broken"])
    paths["report"].write_text(report.to_json())
    return {k: str(v) for k, v in paths.items()}


def _run(*args: str):
    return runner.invoke(app, ["verify", *args])


def test_pass_writes_table_and_json(files, tmp_path):
    out = tmp_path / "report.json"
    res = _run(files["orig"], files["folded"], "--json", str(out), "--batches", "2", "-q")
    assert res.exit_code == EXIT_OK, res.output
    assert "PASS" in res.output and "max abs" in res.output
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["batches"] == 2
    assert data["providers"][0]["outputs"][0]["output"] == "Y"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.json")]


def test_fail_exits_1_and_names_the_fold(files, tmp_path):
    out = tmp_path / "report.json"
    res = _run(files["orig"], files["broken"], "--fold-report", files["report"], "--json", str(out))
    assert res.exit_code == EXIT_FAILED, res.output
    assert "first differing fold: bn1 -> conv1" in res.output
    assert json.loads(out.read_text())["localisation"]["bn"] == "bn1"


def test_unavailable_cuda_exits_3_listing_providers(files):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is available here; test_cuda.py covers it")
    res = _run(files["orig"], files["folded"], "--providers", "cpu,cuda")
    assert res.exit_code == EXIT_PROVIDER, res.output
    assert "not run" in res.output
    assert "available providers: " in res.output
    for name in ort.get_available_providers():
        assert name in res.output


def test_tolerance_options(files):
    assert _run(files["orig"], files["broken"]).exit_code == EXIT_FAILED
    res = _run(files["orig"], files["broken"], "--rtol", "Y:0.05", "--atol", "0.01")
    assert res.exit_code == EXIT_OK, res.output
    res = _run(files["orig"], files["folded"], "--rtol", "abc")
    assert res.exit_code == EXIT_BAD_INPUT and "not a number" in res.output


def test_shapes_and_data(files, tmp_path):
    import numpy as np

    res = _run(files["orig"], files["folded"], "--shape", "X:3x3x8x8")
    assert res.exit_code == EXIT_OK, res.output
    res = _run(files["orig"], files["folded"], "--shape", "X:3x4x8x8")
    assert res.exit_code == EXIT_BAD_INPUT
    assert "fixed to 3" in res.output and "Traceback" not in res.output
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 3, 8, 8), np.float32))
    res = _run(files["orig"], files["folded"], "--data", str(tmp_path / "x.npy"))
    assert res.exit_code == EXIT_OK and "2 batch(es)" in res.output


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda f, t: [str(t / "missing.onnx"), f["folded"]], "does not exist"),
        (lambda f, t: [f["orig"], f["folded"], "--shape", "X"], "--shape"),
        (lambda f, t: [f["orig"], f["folded"], "--json", str(t / "no" / "r.json")], "folder"),
        (lambda f, t: [f["orig"], f["folded"], "--fold-report", str(t / "none.json")], "fold"),
    ],
)
def test_bad_input_is_one_line_exit_2(files, tmp_path, make_args, message):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00garbage")
    res = _run(*make_args(files, tmp_path))
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0


def test_corrupt_model_is_bad_input(files, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00garbage")
    res = _run(str(bad), files["folded"])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "Traceback" not in res.output
