"""``bnfold fold``: table, JSON report, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from bnfold.cli.fold import fold


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer(pretty_exceptions_enable=False)
    a.command("fold")(fold)

    @a.command("noop")
    def noop() -> None:  # a second command keeps "fold" a named subcommand
        """Nothing."""

    return a


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    """Conv -> BN (folds) -> Relu -> BN -> zero-padded Conv (stays: padding)."""
    rng = np.random.default_rng(0)

    def bn(prefix: str, c: int) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{prefix}_s"),
            numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_b"),
            numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_m"),
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{prefix}_v"),
        ]

    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node(
            "BatchNormalization", ["c", "a_s", "a_b", "a_m", "a_v"], ["n"], name="bn1"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization", ["r", "b_s", "b_b", "b_m", "b_v"], ["z"], name="bn2"
        ),
        helper.make_node("Conv", ["z", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])],
        [w1, w2, *bn("a", 4), *bn("b", 4)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return path


def test_fold_prints_table_and_writes_json(app, onnx_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["fold", str(onnx_file), "-o", str(out), "--json", str(report)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "bn1" in result.output and "bn2" in result.output and "zero-padding" in result.output
    assert "1/2 BatchNorms folded" in result.output
    data = json.loads(report.read_text())
    assert data["summary"]["folded"] == 1 and data["summary"]["skipped_by_code"] == {
        "zero-padding": 1
    }
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 1


def test_direction_option(app, onnx_file, tmp_path):
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(
        app, ["fold", str(onnx_file), "-o", str(out), "--direction", "forward"]
    )
    assert result.exit_code == 0, result.output
    assert "direction-disabled" in result.output
    bad = CliRunner().invoke(app, ["fold", str(onnx_file), "-o", str(out), "--direction", "up"])
    assert bad.exit_code == 2 and "direction" in bad.output


@pytest.mark.parametrize(
    "case", ["missing", "not-onnx", "truncated", "same-as-input", "folder-missing"]
)
def test_bad_input_one_line(app, onnx_file, tmp_path, case):
    src, out = onnx_file, tmp_path / "out.onnx"
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "not-onnx":
        src = tmp_path / "text.onnx"
        src.write_text("hello, I am not a model\n")
    elif case == "truncated":
        src = tmp_path / "cut.onnx"
        src.write_bytes(onnx_file.read_bytes()[:200])
    elif case == "same-as-input":
        out = onnx_file
    else:
        out = tmp_path / "missing-folder" / "out.onnx"
    before = onnx_file.read_bytes()
    result = CliRunner().invoke(app, ["fold", str(src), "-o", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert onnx_file.read_bytes() == before
    if case != "same-as-input":
        assert not out.exists()


def test_console_script(onnx_file, tmp_path):
    out = tmp_path / "out.onnx"
    ok = subprocess.run(
        [sys.executable, "-m", "bnfold.cli.app", "fold", str(onnx_file), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "bnfold.cli.app", "fold", str(tmp_path / "x.onnx"), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:")
