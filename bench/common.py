"""Helpers every benchmark script shares: timing, errors, peers, onnxruntime sessions, tables.

The scripts in ``bench/`` run side by side with the peers in one process and report ratios;
the timing rules live here once so every table is measured the same way:

* :func:`interleaved` makes the runs take turns within a round, so the slow phases of a shared
  machine hit each run alike; ratios are then medians of per-round ratios
  (:func:`paired_ratio`), which stay stable where back-to-back timing drifts by 10% or more.
* :func:`best_time` is the best of a few calls, for one-shot passes (load, fold, save) whose
  first-call effects should not count.
* :func:`pin_allocator` takes glibc's dynamic mmap threshold out of the measurements.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import importlib
import importlib.metadata
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pin_allocator() -> bool:
    """Keep freed activation memory in the process (glibc only); returns whether it applied.

    glibc serves large allocations with mmap below a threshold it raises dynamically as blocks
    are freed, so whether each ResNet activation costs fresh page faults depends on what the
    process allocated before. On the 2-core reference machine that alone moves a bare forward
    between 180 and 300 ms. Fixing the mmap and trim thresholds takes that history out, so
    every run is timed in the same (fault-free) state.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds (first-call effects excluded by min)."""
    times = []
    for _ in range(max(repeat, 1)):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.005,
) -> dict[str, list[float]]:
    """Seconds per call of each run over ``repeats`` rounds, the runs taking turns in a round.

    Two things keep sub-millisecond runs comparable: a run faster than ``min_sample_s`` is
    called several times per sample (the count set from its warm-up call), so one sample is
    not a single timer-resolution call; and the order of the runs rotates by one every
    round, so no run always follows the same other run (whose cache footprint and allocator
    state it would otherwise inherit: a fixed order measured the same model 2-6% apart).
    Each sample starts after a full garbage collection: in a process holding torch, one
    costs about 200 ms, and otherwise falls inside whichever run allocates the object that
    sets it off.
    """
    calls: dict[str, int] = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            fn()  # first-call compilation, allocator growth, lazy library loads
        single = (time.perf_counter() - t0) / max(warmup, 1)
        calls[name] = max(1, min(1000, int(min_sample_s / max(single, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = runs[name], calls[name]
            gc.collect()  # no run pays for a full collection the objects of another set off
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return times


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def paired_ratio(base: list[float], run: list[float]) -> float:
    """Median over rounds of ``base / run`` (the speed of ``run`` relative to ``base``)."""
    return statistics.median(a / b for a, b in zip(base, run, strict=True))


def time_ratio(base: list[float], run: list[float]) -> float:
    """Median over rounds of ``run / base`` (the time of ``run`` relative to ``base``)."""
    return statistics.median(b / a for a, b in zip(base, run, strict=True))


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(ref: Any, out: Any) -> float:
    """max |out - ref| / max |ref| (tensors or arrays, compared in float64)."""
    r, o = to_numpy(ref), to_numpy(out)
    return float(np.abs(r - o).max() / max(float(np.abs(r).max()), 1e-30))


def installed(module: str, distribution: str | None = None) -> str | None:
    """The version of an importable peer, or None when it is not installed (or cannot import).

    A peer that fails on import (a wheel built for another torch, a missing system library) is
    as absent as one never installed: the suite reports it 'not installed', never crashes.
    """
    try:
        importlib.import_module(module)
    except Exception:
        return None
    try:
        return importlib.metadata.version(distribution or module)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def ort_session(model: Any, level: str = "all", threads: int = 1, provider: str = "cpu") -> Any:
    """An onnxruntime session on a path or serialized model; level 'disable', 'basic' or 'all'."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[provider]
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=providers)


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (cells rendered with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_results(folder: Path, stem: str, data: object, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``folder`` (created); return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def export_onnx_keep_bn(module: Any, example: Any, exporter: str = "torchscript") -> Any:
    """Export ``module`` to an in-memory ``onnx.ModelProto`` with every BatchNorm kept.

    ``torchscript``: ``torch.onnx.export(dynamo=False, do_constant_folding=False)``, input
    ``input`` with a dynamic batch dimension. ``dynamo``: ``dynamo=True, optimize=False`` (the
    onnxscript optimizer would otherwise fold some BNs itself; it is measured as a peer).
    """
    import io
    import warnings

    import onnx
    import torch

    inputs = example if isinstance(example, tuple) else (example,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                optimize=False,
                verbose=False,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
            )
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(
            module,
            inputs,
            buf,
            dynamo=False,
            do_constant_folding=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
        return onnx.load_from_string(buf.getvalue())


def without_bn(model: Any) -> Any:
    """The same network built without its BN-like layers: the limit a fold can reach.

    Each layer becomes what stays of it when folded (its activation for timm's BN+act
    layers), deleted from a plain ``nn.Sequential``: the replacement a fold makes
    (:func:`bnfold.torchfold.bnlike.put_after_fold`), minus the shift the fold writes into the
    neighbouring layer's bias. The given model is not changed.
    """
    from bnfold.torchfold.bnlike import is_bn_like, put_after_fold

    out = copy.deepcopy(model)
    paths: list[str] = []
    for path, m in out.named_modules():
        if path and is_bn_like(m) and not any(path.startswith(p + ".") for p in paths):
            paths.append(path)
    for path in paths:
        put_after_fold(out, path)
    return out


def with_biases_of(limit: Any, folded: Any) -> Any:
    """``limit`` with a zero bias on every layer that has none where ``folded`` has one.

    The BN-free network as it would be trained (``nn.Conv2d``/``nn.Linear`` default to
    ``bias=True``; only a layer followed by a BN drops it): the same layers, the same calls
    and the bias adds a fold must write (the BN's shift), so a folded model can match it but
    not beat it. Layers are matched by module path; the given ``limit`` is not changed.
    """
    import torch

    out = copy.deepcopy(limit)
    have = dict(folded.named_modules()) if isinstance(folded, torch.nn.Module) else {}
    for path, m in out.named_modules():
        other = have.get(path)
        bias = getattr(other, "bias", None)
        if isinstance(bias, torch.Tensor) and getattr(m, "bias", bias) is None:
            m.bias = torch.nn.Parameter(torch.zeros_like(bias))
    return out
