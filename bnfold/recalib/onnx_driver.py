"""Recalibrate the BatchNormalization nodes of an ONNX model with onnxruntime.

For each pass, a copy of the model gets one extra graph output per measured BN: an
``Identity`` of the BN's input ``X``. onnxruntime runs the copy over the data and the raw
activations are reduced on the host by the same float64 code as the torch path
(:func:`bnfold.recalib.stats.batch_moments`: per-batch mean, then the centred ``M2``, merged
with Chan's formula). Exposing the raw input costs a copy of each BN input per batch, but it
keeps the arithmetic out of the graph, where float32 ``ReduceSumSquare`` would lose precision
and opset-dependent ``axes`` handling would differ between models; and it makes the ONNX and
torch statistics of the same network and data the same numbers.

Only ``mode="population"`` exists here (the torch default): BNs are measured level by level
along the graph (a BN's level is one more than the deepest BN upstream of it), each level's new
``input_mean``/``input_var`` initializers are written before the next level runs, so every BN
is measured under the statistics it will see at inference. A model is a static graph, so the
levels are exact, not probed.

Variance convention: ``input_var`` receives the *unbiased* variance ``M2 / (n - 1)``, the
number PyTorch keeps in ``running_var`` and ``torch.onnx.export`` copies into ``input_var``;
both are used as ``sqrt(var + epsilon)``, so recalibrating before or after export gives the
same model. The caller's ``ModelProto`` is never modified; the result is a new one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bnfold.errors import BadInputError, RecalibrationError
from bnfold.recalib.data import batch_size, first_input, iter_budget
from bnfold.recalib.report import BNStats, RecalibrationReport
from bnfold.recalib.stats import ChannelStats, all_reduce_stats, make_accumulator

__all__ = ["recalibrate_onnx"]

_PROBE_SUFFIX = "__bnfold_recalib_input"


class _OnnxSite:
    """One BatchNormalization node and the initializers it reads."""

    def __init__(
        self,
        node: onnx.NodeProto,
        index: int,
        mean: onnx.TensorProto,
        var: onnx.TensorProto,
        estimator: str,
    ) -> None:
        self.node = node
        self.name = node.name or node.output[0]
        self.index = index
        self.mean_init = mean
        self.var_init = var
        self.old_mean = numpy_helper.to_array(mean).astype(np.float64)
        self.old_var = numpy_helper.to_array(var).astype(np.float64)
        self.acc: ChannelStats = make_accumulator(estimator, int(self.old_mean.size))
        self.level = 1
        self.samples = 0

    @property
    def input(self) -> str:
        return self.node.input[0]


def _round_to_dtype(x64: np.ndarray, like: np.ndarray) -> np.ndarray:
    from bnfold.foldmath import round_to

    return round_to(x64, like.dtype).reshape(like.shape)


def _find_sites(model: onnx.ModelProto, estimator: str) -> tuple[list[_OnnxSite], list[str]]:
    inits = {t.name: t for t in model.graph.initializer}
    sites, skipped = [], []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
        if training or len(node.input) < 5 or not all(n in inits for n in node.input[3:5]):
            skipped.append(node.name or node.output[0])
            continue
        sites.append(_OnnxSite(node, i, inits[node.input[3]], inits[node.input[4]], estimator))
    return sites, skipped


def _levels(model: onnx.ModelProto, sites: list[_OnnxSite]) -> None:
    """Set each site's level: 1 + the deepest BN upstream of its input (graph order)."""
    producer_level: dict[str, int] = {}  # tensor -> deepest BN level upstream of it
    by_index = {s.index: s for s in sites}
    for i, node in enumerate(model.graph.node):
        upstream = max((producer_level.get(n, 0) for n in node.input if n), default=0)
        site = by_index.get(i)
        if site is not None:
            site.level = producer_level.get(site.input, 0) + 1
            out_level = max(upstream, site.level)
        else:
            out_level = upstream
        for out in node.output:
            producer_level[out] = out_level


def _probe_model(model: onnx.ModelProto, sites: list[_OnnxSite]) -> onnx.ModelProto:
    probe = copy.deepcopy(model)
    for s in sites:
        out = s.input + _PROBE_SUFFIX
        probe.graph.node.append(onnx.helper.make_node("Identity", [s.input], [out]))
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    return probe


_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _feeds(batch: Any, inputs: list[Any]) -> dict[str, np.ndarray]:
    """Map a batch to onnxruntime feeds (dict: by name; otherwise the first input)."""
    types = {i.name: _ORT_TO_NP.get(i.type) for i in inputs}
    if isinstance(batch, Mapping):
        unknown = set(batch) - set(types)
        if unknown:
            raise BadInputError(
                f"batch keys {sorted(unknown)} are not model inputs; inputs are: {', '.join(types)}"
            )
        return {k: _to_numpy(v, types[k]) for k, v in batch.items()}
    if len(inputs) != 1:
        raise BadInputError(
            f"the model has {len(inputs)} inputs ({', '.join(types)}); yield dict batches "
            "mapping input names to arrays"
        )
    return {inputs[0].name: _to_numpy(first_input(batch), types[inputs[0].name])}


def _session(model: onnx.ModelProto, providers: list[str] | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # the reference: no graph rewrites (a fusion could fold the very BN being measured)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    available = ort.get_available_providers()
    chosen = providers or ["CPUExecutionProvider"]
    missing = [p for p in chosen if p not in available]
    if missing:
        from bnfold.errors import ProviderUnavailableError

        raise ProviderUnavailableError(
            f"execution provider(s) {', '.join(missing)} unavailable; available providers "
            f"are: {', '.join(available)}"
        )
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=chosen)
    except Exception as e:
        raise BadInputError(f"onnxruntime cannot load the model: {e}".splitlines()[0]) from None


def recalibrate_onnx(
    model: onnx.ModelProto | str | Path,
    data: Iterable[Any],
    *,
    num_samples: int | None = None,
    num_batches: int | None = None,
    mode: str = "population",
    estimator: str = "exact",
    progress: bool = True,
    check_finite: bool = True,
    providers: list[str] | None = None,
) -> RecalibrationReport:
    """Recalibrate an ONNX model; see :func:`bnfold.recalibrate` for the arguments."""
    if mode != "population":
        raise BadInputError(
            "ONNX recalibration supports mode='population' only (BNs use their new statistics "
            "as at inference); recalibrate the torch model for mode='batch'"
        )
    if isinstance(model, str | Path):
        from bnfold.onnx_io import load_onnx

        model = load_onnx(model)
    result = copy.deepcopy(model)
    sites, skipped = _find_sites(result, estimator)
    if not sites:
        raise BadInputError(
            "the ONNX model has no inference BatchNormalization with initializer statistics; "
            "nothing to recalibrate"
        )
    try:
        iter(data)
    except TypeError:
        raise BadInputError(
            f"data of type {type(data).__name__} is not iterable; pass a list of batches"
        ) from None
    if iter(data) is data:
        raise BadInputError(
            "ONNX recalibration makes one pass per BatchNorm depth level and needs data it can "
            "iterate again (a list or a DataLoader), not a one-shot iterator"
        )
    _levels(result, sites)
    levels = sorted({s.level for s in sites})
    report = RecalibrationReport(model=result, framework="onnx", mode=mode, estimator=estimator)
    from bnfold.recalib.torch_driver import _progress

    with _progress(progress) as bar:
        for k, lv in enumerate(levels):
            group = [s for s in sites if s.level == lv]
            session = _session(_probe_model(result, group), providers)
            inputs = session.get_inputs()
            names = [s.input + _PROBE_SUFFIX for s in group]
            task = bar.add_task(f"recalibrating (pass {k + 1}/{len(levels)})", total=num_batches)
            batches = samples = 0
            for i, batch in enumerate(
                iter_budget(data, num_samples=num_samples, num_batches=num_batches)
            ):
                outs = session.run(names, _feeds(batch, inputs))
                for s, x in zip(group, outs, strict=True):
                    t = torch.from_numpy(np.ascontiguousarray(x))
                    s.acc.update(t, 1)
                    s.samples += int(t.shape[0]) if t.dim() else 1
                    if check_finite and not (
                        torch.isfinite(s.acc.mean).all() and torch.isfinite(s.acc.m2).all()
                    ):
                        raise RecalibrationError(
                            f"BatchNormalization {s.name!r} received NaN or Inf activations in "
                            f"batch {i + 1}; check the data and the nodes before it"
                        )
                batches += 1
                samples += batch_size(batch)
                bar.advance(task)
            bar.remove_task(task)
            if batches == 0:
                raise RecalibrationError(
                    "the data yielded no batch; pass a non-empty list of batches (or a larger "
                    "num_samples/num_batches budget)"
                )
            if k == 0:
                report.batches, report.samples = batches, samples
            all_reduce_stats([s.acc for s in group])
            for s in group:
                mean, var = s.acc.result()
                new_mean = _round_to_dtype(
                    mean.numpy(), s.old_mean.astype(numpy_helper.to_array(s.mean_init).dtype)
                )
                new_var = _round_to_dtype(
                    var.numpy(), s.old_var.astype(numpy_helper.to_array(s.var_init).dtype)
                )
                s.mean_init.CopyFrom(numpy_helper.from_array(new_mean, s.mean_init.name))
                s.var_init.CopyFrom(numpy_helper.from_array(new_var, s.var_init.name))
    report.passes = len(levels)
    for s in sites:
        new_mean = numpy_helper.to_array(s.mean_init).astype(np.float64)
        new_var = numpy_helper.to_array(s.var_init).astype(np.float64)
        _mean64, var64 = s.acc.result()
        report.bns.append(
            BNStats(
                name=s.name,
                status="updated",
                channels=int(s.old_mean.size),
                samples=s.samples,
                elements=s.acc.count,
                batches=s.acc.batches,
                level=s.level,
                old_mean_abs=float(np.abs(s.old_mean).mean()),
                new_mean_abs=float(np.abs(new_mean).mean()),
                old_var_mean=float(s.old_var.mean()),
                new_var_mean=float(new_var.mean()),
                max_rel_var_change=float(
                    (
                        np.abs(new_var - s.old_var) / np.maximum(s.old_var, np.finfo(float).tiny)
                    ).max()
                ),
                zero_variance_channels=[int(c) for c in np.nonzero(var64.numpy() == 0)[0]],
            )
        )
    for name in skipped:
        report.bns.append(BNStats(name=name, status="not-recalibrated", channels=0))
    return report
