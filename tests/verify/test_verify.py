"""End-to-end behaviour of bnfold.verify on small ONNX and torch models."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from verify_models import conv_bn_chain, export_onnx, perturb

from bnfold import models
from bnfold.errors import BadInputError
from bnfold.verification import verify
from bnfold.verification.runners import ModelSource, OrtRunner


def test_correct_fold_passes(chain, folded_chain):
    folded, _ = folded_chain
    report = verify(chain, folded, num_batches=3, progress=False)
    assert report.passed
    assert report.verdict == "pass"
    assert report.batches == 3
    (cpu,) = report.providers
    (out,) = cpu.outputs
    assert out.output == "Y" and out.dtype == "float32"
    # A correct fold is not bit-identical (weights rounded once, sums reordered) but close.
    assert 0 < out.max_abs < 1e-5
    assert out.cosine > 1 - 1e-9
    assert out.sqnr_db > 100
    assert out.p50_abs <= out.p99_abs <= out.max_abs
    assert out.mismatches == 0


@pytest.mark.parametrize("site", [0, 1, 2, 3])
def test_perturbed_fold_fails_and_is_localised(chain, folded_chain, site):
    folded, fold_report = folded_chain
    broken = perturb(folded, f"conv{site}", 1e-3)
    report = verify(chain, broken, fold_report=fold_report, progress=False)
    assert not report.passed
    assert report.verdict == "fail"
    assert report.providers[0].outputs[0].mismatches > 0
    loc = report.localisation
    assert loc is not None
    assert loc.bn == f"bn{site}"
    assert loc.target == f"conv{site}"
    assert loc.tensor == f"bn{site}"
    assert loc.checked == site + 1
    assert loc.max_abs > 0


def test_localisation_runs_in_bounded_chunks(chain, folded_chain, monkeypatch):
    """With chunk=1 every run exposes one tensor; the scan stops at the broken site."""
    folded, fold_report = folded_chain
    seen: list[tuple[str, ...]] = []
    original_init = OrtRunner.__init__

    def spy(self, source, provider="CPUExecutionProvider", **kwargs):
        if kwargs.get("extra_outputs"):
            seen.append(tuple(kwargs["extra_outputs"]))
        original_init(self, source, provider, **kwargs)

    monkeypatch.setattr(OrtRunner, "__init__", spy)
    report = verify(
        chain,
        perturb(folded, "conv2", 1e-3),
        fold_report=fold_report,
        localise_chunk=1,
        progress=False,
    )
    assert report.localisation.bn == "bn2"
    assert all(len(names) == 1 for names in seen)
    # reference + candidate per chunk, three chunks (bn0, bn1, bn2), none after the hit.
    assert seen == [("bn0",), ("bn0",), ("bn1",), ("bn1",), ("bn2",), ("bn2",)]


def test_localisation_from_fold_report_json(chain, folded_chain, tmp_path):
    folded, fold_report = folded_chain
    path = tmp_path / "fold.json"
    path.write_text(fold_report.to_json())
    report = verify(chain, perturb(folded, "conv1", 1e-3), fold_report=path, progress=False)
    assert report.localisation.bn == "bn1"
    assert json.loads(report.to_json())["localisation"]["bn"] == "bn1"


def test_no_localisation_when_outputs_match(chain, folded_chain):
    folded, fold_report = folded_chain
    report = verify(chain, folded, fold_report=fold_report, progress=False)
    assert report.passed and report.localisation is None


def test_difference_outside_fold_sites_is_said(chain, folded_chain):
    """A broken non-fold node: every site matches and the report says so."""
    folded, fold_report = folded_chain
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    relu = next(n for n in broken.graph.node if n.output[0] == "Y")
    relu.op_type = "LeakyRelu"
    relu.attribute.append(helper.make_attribute("alpha", 0.1))
    report = verify(chain, broken, fold_report=fold_report, progress=False)
    assert report.verdict == "fail"
    assert report.localisation.bn is None
    assert report.localisation.checked == 4
    assert "outside" in report.localisation.note


def _ort_fused(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    """The model as onnxruntime's own optimizer rewrites it (Conv+BN fused by onnxruntime)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "ort_fused.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = onnx.load(opts.optimized_model_filepath)
    assert not any(n.op_type == "BatchNormalization" for n in fused.graph.node)
    return fused


def test_reference_runs_unoptimised_fold_with_fold_trap(chain, tmp_path):
    """Compared with an optimised reference, onnxruntime's own fold looks bit-identical; the
    unoptimised reference shows its true difference."""
    fused = _ort_fused(chain, tmp_path)
    batch = {"X": np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)}
    src, fused_src = ModelSource("chain", proto=chain), ModelSource("fused", proto=fused)
    optimised_ref = OrtRunner(src, optimized=True).run(batch)["Y"]
    unoptimised_ref = OrtRunner(src, optimized=False).run(batch)["Y"]
    candidate = OrtRunner(fused_src, optimized=True).run(batch)["Y"]
    # The trap: an optimised reference is the same fold as the candidate.
    assert np.array_equal(optimised_ref, candidate)
    true_diff = float(np.abs(candidate.astype(np.float64) - unoptimised_ref).max())
    assert true_diff > 0

    report = verify(chain, fused, inputs=batch, progress=False)
    out = report.providers[0].outputs[0]
    assert out.max_abs == pytest.approx(true_diff, rel=0, abs=0)
    assert "optimizations off" in report.reference

    runner = OrtRunner(src, optimized=False)
    assert runner.options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_unavailable_provider_is_not_run_never_passed(chain, folded_chain):
    folded, _ = folded_chain
    report = verify(chain, folded, providers=("cpu", "cuda"), progress=False)
    cpu, cuda = report.providers
    assert cpu.verdict == "pass"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDAExecutionProvider; covered by test_cuda.py")
    assert cuda.verdict == "not-run"
    assert cuda.runtime == "CUDAExecutionProvider"
    assert "CPUExecutionProvider" in cuda.reason
    assert cuda.outputs == []
    assert report.verdict == "not-run"
    assert not report.passed


def test_failure_outranks_not_run(chain, folded_chain):
    folded, _ = folded_chain
    report = verify(chain, perturb(folded, "conv0", 1e-3), providers="cpu,NoSuchProvider")
    assert report.verdict == "fail"
    assert report.providers[1].verdict == "not-run"
    assert "NoSuchProvider" in report.providers[1].reason


def test_models_are_not_mutated(chain, folded_chain, tmp_path):
    folded, fold_report = folded_chain
    before = (chain.SerializeToString(), folded.SerializeToString())
    path = tmp_path / "folded.onnx"
    onnx.save(folded, path)
    file_before = path.read_bytes()
    verify(chain, path, fold_report=fold_report, progress=False)
    verify(chain, perturb(folded, "conv1", 1e-3), fold_report=fold_report, progress=False)
    assert (chain.SerializeToString(), folded.SerializeToString()) == before
    assert path.read_bytes() == file_before


def test_tolerance_overrides_globally_and_per_output(chain, folded_chain):
    folded, _ = folded_chain
    broken = perturb(folded, "conv3", 1e-3)
    assert not verify(chain, broken).passed
    assert verify(chain, broken, rtol=0.05, atol=1e-2).passed
    assert verify(chain, broken, rtol={"Y": 0.05}, atol={"Y": 1e-2}).passed
    # A tolerance for an output the model does not have is a typo, not a silent no-op.
    with pytest.raises(BadInputError, match=r"names output.* other .*outputs are: Y"):
        verify(chain, broken, rtol={"other": 0.05}, atol={"other": 1e-2})
    # Tight enough that even the correct fold's rounding fails.
    assert not verify(chain, folded, rtol=0.0, atol=0.0).passed


def test_seed_and_batches_are_reproducible(chain, folded_chain):
    folded, _ = folded_chain
    a = verify(chain, folded, seed=3, num_batches=2).providers[0].outputs[0]
    b = verify(chain, folded, seed=3, num_batches=2).providers[0].outputs[0]
    c = verify(chain, folded, seed=4, num_batches=2).providers[0].outputs[0]
    assert a.max_abs == b.max_abs and a.p99_abs == b.p99_abs
    assert (a.max_abs, a.p99_abs) != (c.max_abs, c.p99_abs)
    assert a.elements == 2 * 4 * 8 * 8


def test_shapes_set_symbolic_batch(chain, folded_chain):
    folded, _ = folded_chain
    report = verify(chain, folded, shapes=["X:5x3x8x8"])
    assert report.providers[0].outputs[0].shape == (5, 4, 8, 8)
    report = verify(chain, folded, shapes={"X": (2, 3, 8, 8)})
    assert report.providers[0].outputs[0].shape == (2, 4, 8, 8)
    with pytest.raises(BadInputError, match="dim 1 is fixed to 3"):
        verify(chain, folded, shapes={"X": (2, 4, 8, 8)})
    with pytest.raises(BadInputError, match="unknown input"):
        verify(chain, folded, shapes={"nope": (2, 3, 8, 8)})


def test_real_data_npz_and_loader(chain, folded_chain, tmp_path):
    folded, _ = folded_chain
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((3, 2, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=arr)
    report = verify(chain, folded, data=tmp_path / "d.npz")
    assert report.batches == 3 and report.seed is None and report.passed
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(arr[0]), torch.zeros(2)), batch_size=1
    )
    report = verify(chain, folded, data=loader)
    assert report.batches == 2 and report.passed
    assert verify(chain, folded, data=loader, num_batches=1).batches == 1


def test_unsupported_inputs_raise_bad_input(chain, folded_chain, tmp_path):
    folded, _ = folded_chain
    with pytest.raises(BadInputError, match="does not exist"):
        verify(tmp_path / "missing.onnx", folded)
    with pytest.raises(BadInputError, match="not both"):
        verify(chain, folded, inputs=np.zeros((1, 3, 8, 8), np.float32), data=[])
    with pytest.raises(BadInputError, match="cannot verify a"):
        verify(object(), folded)
    other = conv_bn_chain(channels=(3, 8, 5))
    with pytest.raises(BadInputError, match="differs from the reference shape"):
        verify(other, folded)


def _fp16_mul_model(scale: float) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "s"], ["Y"])],
        "fp16",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [4, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [4, 16])],
        [numpy_helper.from_array(np.array([scale], dtype=np.float16), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_float16_uses_float16_ulps_and_tolerances():
    ref = _fp16_mul_model(1.5)
    one_ulp = float(np.nextafter(np.float16(1.5), np.float16(2)))
    report = verify(ref, _fp16_mul_model(one_ulp))
    out = report.providers[0].outputs[0]
    assert out.dtype == "float16" and out.rtol == 1e-2
    assert 1 <= out.max_ulp <= 2
    assert report.passed
    assert not verify(ref, _fp16_mul_model(1.56)).passed


def test_int_and_bool_inputs_and_exact_int_outputs():
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
            helper.make_node("Where", ["mask", "g", "zero"], ["Y"]),
            helper.make_node("Add", ["idx", "idx"], ["I"]),
        ],
        "intbool",
        [
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 3, 2]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3, 2]),
            helper.make_tensor_value_info("I", TensorProto.INT64, ["N", 3]),
        ],
        [
            numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "table"),
            numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = verify(model, model, shapes={"idx": (5, 3), "mask": (5, 3, 2)}, num_batches=2)
    assert report.passed
    ints = next(o for o in report.providers[0].outputs if o.output == "I")
    assert ints.dtype == "int64" and ints.rtol == 0 and ints.atol == 0
    assert math.isinf(ints.sqnr_db)


def test_torch_float64_reference_against_onnx_candidate():
    module, x = models.build("resnet-mini")
    exported = export_onnx(module, x)
    state = copy.deepcopy(module.state_dict())
    report = verify(module, exported, shapes={"input": tuple(x.shape)}, num_batches=2)
    assert report.passed, str(report)
    out = report.providers[0].outputs[0]
    assert out.output == "logits" and out.max_abs > 0
    assert "float64" in report.reference
    # The user's module is untouched: same dtype, same parameters.
    assert next(module.parameters()).dtype == torch.float32
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_torch_against_torch_with_example_inputs():
    module, x = models.build("mlp")
    broken = copy.deepcopy(module)
    with torch.no_grad():
        next(broken.parameters()).mul_(1 + 1e-3)
    assert verify(module, copy.deepcopy(module), inputs=x).passed
    report = verify(module, broken, inputs=x)
    assert report.verdict == "fail"
    assert report.providers[0].runtime == "torch:cpu"
    with pytest.raises(BadInputError, match="two torch modules need"):
        verify(module, broken)


def test_bnfold_verify_is_callable_after_submodule_imports(chain, folded_chain):
    """Public functions must not be shadowed by a package of the same name."""
    import bnfold
    import bnfold.pipeline
    import bnfold.verification.compare

    assert callable(bnfold.export)

    folded, _ = folded_chain
    assert bnfold.verify(chain, folded).passed
    assert isinstance(bnfold.verify(chain, folded), bnfold.VerifyReport)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_that_fails_to_start_is_not_run(chain, folded_chain, monkeypatch):
    """A provider onnxruntime lists but cannot start reports not-run, not a crash or a pass."""
    import bnfold.verification.check as verify_pkg

    folded, _ = folded_chain
    monkeypatch.setattr(
        verify_pkg, "available_providers", lambda: ["FakeExecutionProvider", "CPUExecutionProvider"]
    )
    report = verify(chain, folded, providers=("cpu", "FakeExecutionProvider"))
    assert [p.verdict for p in report.providers] == ["pass", "not-run"]
    assert "could not start" in report.providers[1].reason
    assert not report.passed
