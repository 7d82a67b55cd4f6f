"""Bad data and bad options: one line, the documented exit code, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from .hostile import assert_refused, run
from .test_invalid_onnx import conv_bn


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture
def model_file(folder: Path) -> Path:
    path = folder / "model.onnx"
    onnx.save(conv_bn(), str(path))
    return path


def _npy(folder: Path, name: str, shape: tuple[int, ...]) -> Path:
    path = folder / name
    np.save(path, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return path


def _strings_module(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (folder / "stringdata.py").write_text("def batches():\n    yield 'abc'\n    yield 'def'\n")
    monkeypatch.syspath_prepend(str(folder))
    return "stringdata:batches"


DATA_CASES = {
    "wrong-channels": lambda f, mp: str(_npy(f, "c.npy", (4, 5, 16, 16))),
    "wrong-rank": lambda f, mp: str(_npy(f, "r.npy", (4, 3, 16))),
    "strings": _strings_module,
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_recalibrate_torch_with_data_the_model_cannot_take(
    folder: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    data = DATA_CASES[case](folder, monkeypatch)
    out = folder / "out" / "r.pt"
    args = ["recalibrate", "resnet-mini", "--data", data, "-o", out, "--no-progress"]
    assert_refused(args, 2, outputs=[out], match="the model cannot run on a batch")


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_recalibrate_onnx_with_data_the_model_cannot_take(
    folder: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    data = DATA_CASES[case](folder, monkeypatch)
    out = folder / "out" / "r.onnx"
    args = ["recalibrate", model_file, "--data", data, "-o", out, "--batch-size", "1"]
    assert_refused([*args, "--no-progress"], 2, outputs=[out], inputs=[model_file])


def test_recalibrate_onnx_reads_data_in_the_models_fixed_batch_size(
    folder: Path, model_file: Path
) -> None:
    """A model fixed to batch 2 gets batches of 2 (not the default 32), and the short last
    batch of 5 samples is left out, with a note, instead of failing or being padded."""
    m = onnx.load(str(model_file))
    for vi in (m.graph.input[0], m.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    fixed = folder / "fixed2.onnx"
    onnx.save(m, str(fixed))
    data = _npy(folder, "d.npy", (5, 3, 8, 8))
    out = folder / "out" / "r.onnx"
    outcome = run(["recalibrate", fixed, "--data", data, "-o", out, "--no-progress"])
    assert outcome.code == 0, outcome.stderr
    text = " ".join(outcome.stdout.split())
    assert "fixes the batch size to 2" in text and "left out the last 1 sample(s)" in text
    assert "4 samples" in text and out.exists()


def test_recalibrate_pt2_reads_data_in_the_programs_fixed_batch_size(folder: Path) -> None:
    """A .pt2 exported without dynamic shapes (the default) fixes its batch size: the data is
    read in batches of that size and the short last batch is left out, with a note, where
    the default --batch-size 32 would be refused by the program's input check."""
    import torch

    from bnfold.models import build

    module, x = build("resnet-mini")
    program = folder / "static.pt2"
    torch.export.save(torch.export.export(module, (x,)), program)
    data = _npy(folder, "d.npy", (5, *x.shape[1:]))
    out = folder / "out" / "r.pt2"
    outcome = run(["recalibrate", program, "--data", data, "-o", out, "--no-progress"])
    assert outcome.code == 0, outcome.stderr
    text = " ".join(outcome.stdout.split())
    assert x.shape[0] == 2
    assert "fixes the batch size to 2" in text and "left out the last 1 sample(s)" in text
    assert out.exists()


def test_a_folder_mixing_sample_shapes(folder: Path, model_file: Path) -> None:
    data = folder / "mixed"
    data.mkdir()
    _npy(data, "a.npy", (2, 3, 8, 8))
    _npy(data, "b.npy", (2, 3, 6, 6))
    out = folder / "out" / "r.onnx"
    args = ["recalibrate", model_file, "--data", data, "-o", out, "--batch-size", "1"]
    assert_refused([*args, "--no-progress"], 2, outputs=[out], match="expects 1x3x8x8")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_data_cache_mb_must_be_finite(folder: Path, value: str) -> None:
    data = _npy(folder, "d.npy", (4, 3, 16, 16))
    out = folder / "out" / "r.pt"
    args = ["recalibrate", "resnet-mini", "--data", data, "-o", out, "--data-cache-mb", value]
    assert_refused([*args, "--no-progress"], 2, outputs=[out], match="data_cache_mb")


def _renamed(
    model_file: Path, folder: Path, *, input: str | None = None, output: str | None = None
):
    m = onnx.load(str(model_file))
    if input:
        m.graph.node[0].input[0] = m.graph.input[0].name = input
    if output:
        m.graph.node[-1].output[0] = m.graph.output[0].name = output
    path = folder / "renamed.onnx"
    onnx.save(m, str(path))
    return path


def test_verify_candidate_with_other_input_names(folder: Path, model_file: Path) -> None:
    cand = _renamed(model_file, folder, input="image")
    assert_refused(["verify", model_file, cand, "-q"], 2, inputs=[cand], match="image")


def test_verify_candidate_with_other_output_names(folder: Path, model_file: Path) -> None:
    """Nothing would be compared: an error, never a pass."""
    cand = _renamed(model_file, folder, output="logits")
    assert_refused(["verify", model_file, cand, "-q"], 2, match="outputs (logits) differ")


def test_verify_tolerance_for_an_unknown_output(model_file: Path) -> None:
    args = ["verify", model_file, model_file, "--rtol", "NOSUCHOUTPUT:1e-3", "-q"]
    assert_refused(args, 2, match="NOSUCHOUTPUT")


def test_verify_negative_seed(model_file: Path) -> None:
    assert_refused(["verify", model_file, model_file, "--seed", "-1", "-q"], 2, match="seed")


def test_verify_shape_too_large_for_memory(folder: Path) -> None:
    m = conv_bn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = folder / "dynamic.onnx"
    onnx.save(m, str(path))
    args = ["verify", path, path, "--shape", "x:100000000x3x8x8", "-q"]
    assert_refused(args, 2, match="GiB")


def test_export_with_a_provider_that_is_not_installed(folder: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the refusal needs a machine without it")
    out = folder / "out" / "m.onnx"
    outcome = assert_refused(
        ["export", "resnet-mini", "-o", out, "--providers", "cpu,cuda", "-q"], 3, outputs=[out]
    )
    assert "CPUExecutionProvider" in outcome.stderr


def test_constant_nodes_keep_their_tensors_checked(folder: Path) -> None:
    """A Constant node whose value holds fewer bytes than its dims: refused, not folded."""
    m = conv_bn()
    bad = onnx.TensorProto(name="k", data_type=onnx.TensorProto.FLOAT, dims=[4])
    bad.float_data.extend([1.0, 2.0])
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=bad))
    path = folder / "const.onnx"
    onnx.save(m, str(path))
    out = folder / "out" / "f.onnx"
    assert_refused(["fold", path, "-o", out], 2, outputs=[out], inputs=[path], match="'k'")


def test_recalibrate_a_bare_state_dict_points_to_factory_and_weights(folder: Path) -> None:
    import torch

    from bnfold.models import build

    weights = folder / "weights.pt"
    torch.save(build("resnet-mini")[0].state_dict(), weights)
    data = _npy(folder, "d.npy", (4, 3, 32, 32))
    out = folder / "out" / "r.pt"
    outcome = assert_refused(
        ["recalibrate", weights, "--data", data, "-o", out, "--no-progress"],
        2,
        outputs=[out],
        inputs=[weights],
        match="--weights",
    )
    assert "bnfold.recalibrate" in " ".join(outcome.stderr.split())
