"""Invalid ONNX is refused before a fold, never written with exit 0; 0/0 BNs stay unfolded.

Each case starts from a valid Conv -> BN model and breaks one rule of the ONNX spec that
``onnx.checker`` (full check) or bnfold's own structural checks catch; every case is also a
model onnxruntime refuses to load, or one whose folded output could not be trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError
from bnfold.sites import SkipCode

from .hostile import assert_refused

C = 4


def _params(**over: np.ndarray) -> dict[str, np.ndarray]:
    p = {
        "s": np.linspace(0.5, 1.5, C, dtype=np.float32),
        "b": np.linspace(-1, 1, C, dtype=np.float32),
        "m": np.linspace(-0.2, 0.3, C, dtype=np.float32),
        "v": np.linspace(0.5, 2, C, dtype=np.float32),
    }
    p.update(over)
    return p


def conv_bn(
    *,
    opset: int = 15,
    dtype: int = TensorProto.FLOAT,
    params: dict[str, np.ndarray] | None = None,
    **bn_attrs: object,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in (params or _params()).items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn", **bn_attrs
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", dtype, [1, C, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _short_data(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].raw_data = m.graph.initializer[1].raw_data[:8]


def _cycle(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = "y"


def _dangling(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "nothing"


def _duplicate_output(m: onnx.ModelProto) -> None:
    m.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 6, 6])])


def _missing_initializer(m: onnx.ModelProto) -> None:
    del m.graph.initializer[4]


CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "no-graph": (onnx.ModelProto, "no graph"),
    "short-data": (lambda: _edited(_short_data), "holds 8 bytes"),
    "cycle": (lambda: _edited(_cycle), "produced by no earlier node"),
    "dangling-input": (lambda: _edited(_dangling), "'nothing'"),
    "duplicate-output": (lambda: _edited(_duplicate_output), "listed twice"),
    "missing-initializer": (lambda: _edited(_missing_initializer), "'v'"),
    "param-rank": (
        lambda: conv_bn(params=_params(s=np.ones((C, 1), np.float32))),
        "expected to have rank 1",
    ),
    "param-length": (lambda: conv_bn(params=_params(s=np.ones(3, np.float32))), "mismatch"),
    "scalar-var": (lambda: conv_bn(params=_params(v=np.float32(1))), "rank 0"),
    "training-mode-at-9": (lambda: conv_bn(opset=9, training_mode=0), "training_mode"),
    "spatial-at-15": (lambda: conv_bn(spatial=1), "spatial"),
    "integer-input": (lambda: conv_bn(dtype=TensorProto.INT32), "int32"),
}


def _edited(edit: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    m = conv_bn()
    edit(m)
    return m


def test_the_base_model_is_valid_and_folds() -> None:
    m = conv_bn()
    onnx.checker.check_model(m, full_check=True)
    _, report = bnfold.fold(m)
    assert report.decisions[0].folded


@pytest.mark.parametrize("kind", sorted(CASES))
def test_invalid_model_is_refused_by_the_api(kind: str) -> None:
    build, reason = CASES[kind]
    with pytest.raises(BadInputError, match=r"not .*ONNX model") as caught:
        bnfold.fold(build())
    message = str(caught.value)
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("kind", sorted(set(CASES) - {"no-graph"}))
def test_every_refused_case_is_one_a_runtime_rejects_or_misreads(kind: str) -> None:
    """Ground truth for the refusals: onnxruntime does not load these (a duplicated output
    name loads, but its outputs cannot be told apart by name)."""
    model = CASES[kind][0]()
    if kind == "duplicate-output":
        assert len({o.name for o in model.graph.output}) < len(model.graph.output)
        return
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own error types
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_invalid_file_is_refused_by_the_cli(tmp_path: Path, kind: str) -> None:
    src = tmp_path / f"{kind}.onnx"
    src.write_bytes(CASES[kind][0]().SerializeToString())
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = tmp_path / "out" / "fold.json"
    assert_refused(
        ["fold", src, "-o", out, "--json", report],
        2,
        outputs=[out, report],
        inputs=[src],
        match="ONNX model",
    )


def test_shapeless_graph_output_is_still_accepted() -> None:
    """A graph output without a shape (rank unknown) is valid for runtimes, not refused."""
    m = conv_bn()
    m.graph.output[0].type.tensor_type.ClearField("shape")
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    _, report = bnfold.fold(m)
    assert report.decisions[0].folded


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_zero_variance_with_zero_epsilon_stays_unfolded() -> None:
    """var = 0 and epsilon = 0 make 0/0: the BN stays, and NaN stays where the original has it."""
    m = conv_bn(params=_params(v=np.array([0, 1, 1, 1], np.float32)), epsilon=0.0)
    folded, report = bnfold.fold(m)
    decision = report.decisions[0]
    assert not decision.folded and decision.code is SkipCode.NON_FINITE
    assert "channel(s) 0" in decision.reason
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a, b = _run(m, x), _run(folded, x)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isfinite(a[:, 1:]).all()


def test_zero_variance_in_torch_stays_unfolded() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C, eps=0.0)).eval()
    model[1].running_var[0] = 0.0
    folded, report = bnfold.fold(model, (torch.randn(1, 3, 8, 8),))
    assert report.decisions[0].code is SkipCode.NON_FINITE
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.isfinite(a[:, 1:]).all()


@pytest.mark.parametrize("location", ["/etc/hostname", "../../../../../etc/hostname"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    """A crafted location must not make bnfold read (and copy into its output) other files."""
    tensor = onnx.TensorProto(name="w", data_type=TensorProto.UINT8, dims=[5])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [5])],
        [tensor],
    )
    src = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(src))
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    assert_refused(["fold", src, "-o", out], 2, outputs=[out], inputs=[src], match="external data")
