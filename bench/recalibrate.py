"""Recalibration side by side with ``torch.optim.swa_utils.update_bn`` and a bare forward.

Seven tables:

1. Statistics error of the first BatchNorm (its input does not depend on other BNs, so every
   tool measures the same activations) against a float64 whole-data oracle, on data built to
   defeat per-batch averaging: images with a per-image offset (correlated pixels) and
   class-ordered batches.
2. Throughput over the same loader as a ratio to a bare ``torch.no_grad()`` forward (the
   limit): bnfold ``mode="batch"`` (one pass, the like-for-like comparison with update_bn),
   ``update_bn``, and bnfold ``mode="population"`` (one pass per depth level, each stopping
   after its deepest BN; its ratio is in total and per pass on average). The runs take turns
   in each round and the ratio is the median over rounds; glibc's allocator is pinned first
   (see :func:`pin_allocator`) so page faults do not depend on what ran before.
3. Population mode's strategies (``--tables strategies``): per mode, the recalibration time as
   a ratio to a bare no-grad forward over the same loader, and the peak memory of the kept
   frontier, for the frontier (each layer once per sample) with the default budget and with
   no budget at all (every pass recomputes from the data), next to the per-level passes
   (``strategy="per-level"``), ``mode="batch"`` and ``update_bn``. ``--size`` sets the input's
   spatial size.
4. The ONNX driver's cost of building its probe copy with onnx-graphsurgeon, next to running
   onnxruntime over the same data (``mode="batch"``: one probe copy, one pass).

``--model`` takes a ``models/`` name or ``torchvision:resnet18`` (any torchvision model name).

5. The grid (``--tables grid``): table 3 without the recompute row for each of ``--models``
   (default resnet-mini and torchvision resnet18/resnet50/mobilenet_v2/densenet121) at each
   of ``--thread-list`` (default 1,2), then one markdown table. The issue's setting:
   ``--tables grid --size 64 --batches 16 --batch-size 32 --repeats 3``.

6. One batch-mode BN call (``--tables bn-call``): ``batch_norm`` alone, the float64 reduction
   followed by ``batch_norm``, and the fused call that does both from one read, on
   mobilenet_v2's BN input shapes at 64x64 (``--batch-size 32``).

7. The same call in context (``--tables bn-context``): a 1x1 convolution, the BN call and a
   ReLU in a loop, on those of the shapes the row loop takes, with the kernels' threads split
   by samples (as batch mode runs them) and by channel ranges, beside ``batch_norm``, and the
   ReLU after each (``--threads 2``: the split only matters with more than one thread).

Run: ``python bench/recalibrate.py [--model resnet-mini] [--batches 16] [--batch-size 64]
[--threads 1] [--no-population]``. ``BNFOLD_NO_JIT=1`` times the torch fallback instead of the
compiled moment kernels.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnfold
from bench.common import (
    best_time,
    installed,
    interleaved,
    paired_ratio,
    pin_allocator,
    time_ratio,
)
from bnfold.models import build as build_reference
from bnfold.recalib import passes as recal_passes


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ``models/`` net, or ``torchvision:<name>`` (random weights, eval mode, 224x224
    example; torchvision must import beside torch)."""
    if not name.startswith("torchvision:"):
        return build_reference(name)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name.split(":", 1)[1], weights=None).eval()
    return model, torch.randn(1, 3, 224, 224)


def oracle_var(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1).numpy()
    mean = x64.mean(1)
    return mean, ((x64 - mean[:, None]) ** 2).sum(1) / (x64.shape[1] - 1)


def first_bn_input(model: torch.nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    h = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    return torch.cat(seen)


def correlated(n: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return (
        torch.randn(n, shape[0], 1, 1, generator=gen) * 3
        + torch.randn(n, *shape, generator=gen) * 0.3
    )


def class_ordered(n: int, shape: tuple[int, ...], gen: torch.Generator, bs: int) -> torch.Tensor:
    classes = max(n // bs, 1)
    means = torch.randn(classes, shape[0], 1, 1, generator=gen) * 4
    x = means.repeat_interleave(bs, 0)[:n] + torch.randn(n, *shape, generator=gen)
    return x


def error_table(model_name: str, batches: int, bs: int) -> list[dict[str, Any]]:
    """Max relative error of the first BN's mean and variance vs the float64 oracle, per tool."""
    model, example = build(model_name)
    shape = tuple(example.shape[1:])
    gen = torch.Generator().manual_seed(0)
    print(
        f"\nStatistics error of the first BN vs float64 oracle ({model_name}, "
        f"{batches} batches of {bs})"
    )
    print(f"{'data':<16}{'tool':<34}{'max rel err mean':>18}{'max rel err var':>18}")
    out: list[dict[str, Any]] = []
    for data_name in ("correlated", "class-ordered"):
        n = batches * bs
        x = (
            correlated(n, shape, gen)
            if data_name == "correlated"
            else class_ordered(n, shape, gen, bs)
        )
        data = [x[i : i + bs] for i in range(0, n, bs)]
        mean, var = oracle_var(first_bn_input(model, data))
        rows = []
        m = copy.deepcopy(model)
        bnfold.recalibrate(m, data, mode="batch", progress=False)
        rows.append(("bnfold exact", m))
        m = copy.deepcopy(model)
        bnfold.recalibrate(m, data, mode="batch", estimator="batch-variance-mean", progress=False)
        rows.append(("bnfold batch-variance-mean", m))
        m = copy.deepcopy(model)
        update_bn(data, m)
        rows.append(("swa_utils.update_bn", m))
        if installed("fvcore") is not None:
            m = copy.deepcopy(model)
            fvcore_precise_bn(m, data)
            rows.append(("fvcore precise BN", m))
        else:
            out.append({"data": data_name, "tool": "fvcore precise BN", "status": "not installed"})
        for tool, mm in rows:
            bn = next(b for b in mm.modules() if isinstance(b, torch.nn.BatchNorm2d))
            em = np.max(np.abs(bn.running_mean.double().numpy() - mean) / np.abs(mean))
            ev = np.max(np.abs(bn.running_var.double().numpy() - var) / var)
            print(f"{data_name:<16}{tool:<34}{em:>18.3e}{ev:>18.3e}")
            out.append({"data": data_name, "tool": tool, "mean_err": em, "var_err": ev})
    return out


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeats)


def fvcore_precise_bn(model: torch.nn.Module, data: Any) -> None:
    """fvcore's precise BN: equal-weight average of per-batch statistics, like update_bn."""
    from fvcore.nn.precise_bn import update_bn_stats

    batches = [b[0] if isinstance(b, (list, tuple)) else b for b in data]
    # fvcore updates only BNs in training mode (it leaves an eval-mode model untouched).
    was_training = model.training
    model.train()
    try:
        update_bn_stats(model, batches, num_iters=len(batches))
    finally:
        model.train(was_training)


def throughput_table(
    model_name: str, batches: int, bs: int, repeats: int, population: bool = True
) -> list[dict[str, Any]]:
    """Samples/s and speed relative to a bare forward (median of per-round ratios), per run."""
    model, example = build(model_name)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(bs, *example.shape[1:], generator=gen) for _ in range(batches)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(data)), batch_size=bs
    )

    def bare() -> None:
        with torch.no_grad():
            for (x,) in loader:
                model(x)

    m_upd = copy.deepcopy(model)
    m_b = copy.deepcopy(model)
    m_p = copy.deepcopy(model)
    runs: dict[str, Callable[[], object]] = {
        "bare": bare,
        "batch": lambda: bnfold.recalibrate(m_b, loader, mode="batch", progress=False),
        "update_bn": lambda: update_bn(loader, m_upd),
    }
    if installed("fvcore") is not None:
        m_fv = copy.deepcopy(model)
        runs["fvcore"] = lambda: fvcore_precise_bn(m_fv, loader)
    passes = 0
    if population:
        passes = bnfold.recalibrate(copy.deepcopy(model), loader, progress=False).passes
        runs["population"] = lambda: bnfold.recalibrate(m_p, loader, progress=False)
    times = interleaved(runs, repeats)
    samples = batches * bs
    print(
        f"\nThroughput ({model_name}, {batches} batches of {bs}, {torch.get_num_threads()} "
        f"thread(s), {repeats} interleaved rounds; samples/s of the best round, ratio = median "
        "over rounds)"
    )
    print(f"{'run':<40}{'samples/s':>12}{'vs bare forward':>18}")
    rows = [
        ("bare torch.no_grad() forward (limit)", times["bare"]),
        ("bnfold mode=batch (one pass)", times["batch"]),
        ("swa_utils.update_bn (one pass)", times["update_bn"]),
    ]
    if "fvcore" in times:
        rows.append(("fvcore precise BN (one pass)", times["fvcore"]))
    if population:
        rows += [
            (f"bnfold mode=population ({passes} passes)", times["population"]),
            ("bnfold mode=population, mean pass", [t / passes for t in times["population"]]),
        ]
    out = []
    for name, t in rows:
        ratio = paired_ratio(times["bare"], t)
        print(f"{name:<40}{samples / min(t):>12.1f}{ratio:>17.2f}x")
        out.append({"run": name, "samples_per_s": samples / min(t), "vs_bare": ratio})
    if "fvcore" not in times:
        out.append({"run": "fvcore precise BN (one pass)", "status": "not installed"})
    return out


def strategies_table(
    model_name: str,
    batches: int,
    bs: int,
    repeats: int,
    size: int | None,
    per_level: bool,
    recompute: bool = True,
) -> dict[str, tuple[float, float | None]]:
    """Print and return, per run, ``(speed vs a bare forward, peak kept MiB or None)``."""
    model, example = build(model_name)
    shape = tuple(example.shape[1:])
    if size is not None:
        shape = shape[:1] + (size,) * (len(shape) - 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batches * bs, *shape, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=bs)
    # The bare forward runs the recalibrated model, so it sees the activations the passes see:
    # with torchvision's initial statistics (mean 0, var 1) a random deep net's activations
    # drift towards tiny or huge values, and the same forward is 10-15% slower
    # (mobilenet_v2, densenet121 at 64x64), which would flatter the recalibration's ratio.
    bnfold.recalibrate(model, loader, progress=False)

    def bare() -> None:
        with torch.no_grad():
            for (xb,) in loader:
                model(xb)

    copies = {k: copy.deepcopy(model) for k in ("frontier", "tiny", "per-level", "batch", "upd")}
    reports: dict[str, bnfold.RecalibrationReport] = {}

    def recal(key: str, **kw: object) -> Callable[[], object]:
        def run() -> None:
            reports[key] = bnfold.recalibrate(copies[key], loader, progress=False, **kw)

        return run

    copies["two-step"] = copy.deepcopy(model)

    def two_step() -> None:
        # batch mode as it ran before the fused kernel: reduce, then batch_norm (two reads)
        recal_passes.FUSED_BATCH_MODE = False
        try:
            bnfold.recalibrate(copies["two-step"], loader, mode="batch", progress=False)
        finally:
            recal_passes.FUSED_BATCH_MODE = True

    runs: dict[str, Callable[[], object]] = {
        "bare": bare,
        "frontier": recal("frontier"),
        "batch": recal("batch", mode="batch"),
        "two-step": two_step,
        "upd": lambda: update_bn(loader, copies["upd"]),
    }
    if recompute:
        runs["tiny"] = recal("tiny", data_cache_mb=0, spill_mb=0)
    if per_level:
        runs["per-level"] = recal("per-level", strategy="per-level")
    times = interleaved(runs, repeats)
    passes = reports["frontier"].passes
    print(
        f"\nPopulation-mode strategies ({model_name}, input {'x'.join(map(str, shape))}, "
        f"{batches} batches of {bs}, {torch.get_num_threads()} thread(s), {repeats} round(s); "
        f"{passes} levels)"
    )
    print(f"{'run':<52}{'vs bare forward':>16}{'peak kept MiB':>15}")
    out: dict[str, tuple[float, float | None]] = {}
    rows = [
        ("population, frontier (default budget)", "frontier"),
        ("population, frontier, no budget (recompute)", "tiny"),
        ("population, per-level passes", "per-level"),
        ("batch mode (one pass)", "batch"),
        ("batch mode, two-step reduce + batch_norm", "two-step"),
        ("swa_utils.update_bn (one pass)", "upd"),
    ]
    for label, key in rows:
        if key not in times:
            continue
        rep = reports.get(key)
        mib = None if rep is None else rep.peak_memory_mb + rep.peak_spill_mb
        ratio = paired_ratio(times["bare"], times[key])
        out[key] = (ratio, mib)
        print(f"{label:<52}{ratio:>15.3f}x{'' if mib is None else f'{mib:.1f}':>15}")
    return out


#: The grid the issue's table asks for: these models at 64x64, 512 samples in batches of 32.
GRID_MODELS = (
    "resnet-mini",
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:densenet121",
)


def grid_table(
    models: list[str], threads: list[int], batches: int, bs: int, repeats: int, size: int
) -> list[dict[str, Any]]:
    """The strategies table for every model and thread count, then one markdown summary.

    The recompute-everything row (no budget) is left out: it costs one forward per level
    (~120 forwards on densenet121) and is measured on resnet-mini by ``--tables strategies``.
    """
    results: list[dict[str, Any]] = []
    for name in models:
        for n in threads:
            torch.set_num_threads(n)
            r = strategies_table(name, batches, bs, repeats, size, False, recompute=False)
            results.append({"model": name, "threads": n, **r})
    print(
        "\n| model | threads | population (frontier) | kept MiB | batch mode | batch mode, "
        "two-step | update_bn |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        pop, mib = r["frontier"]
        print(
            f"| {r['model']} | {r['threads']} | {pop:.2f}x | {mib:.0f} | "
            f"{r['batch'][0]:.2f}x | {r['two-step'][0]:.2f}x | {r['upd'][0]:.2f}x |"
        )
    return results


#: BN inputs of mobilenet_v2 at 64x64 in batches of 32 (channels, map side), and a (N, C) one.
BN_CALL_SHAPES = ((96, 32), (32, 32), (144, 16), (192, 8), (384, 4), (960, 2), (1280, 1))


def _bn_call_times(x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of the three ways one batch-mode BN call can run on ``x``."""
    from bnfold.recalib.stats import FusedBatchNorm, moments

    channels = x.shape[1]
    gen = torch.Generator().manual_seed(channels)
    weight = torch.rand(channels, generator=gen) + 0.5
    bias = torch.randn(channels, generator=gen)
    mean, var = torch.zeros(channels), torch.ones(channels)
    # what batch mode calls: one per BN, its layout and affine vectors kept between calls
    fused = FusedBatchNorm(1e-5)

    def two_step() -> None:
        n, m, m2 = moments(x, 1)
        batch_mean, batch_var = torch.from_numpy(m).float(), torch.from_numpy(m2 / n).float()
        F.batch_norm(x, batch_mean, batch_var, weight, bias)

    return interleaved(
        {
            "bn": lambda: F.batch_norm(x, mean, var, weight, bias),
            "two-step": two_step,
            "fused": lambda: fused(x, weight, bias),
        },
        repeats,
    )


def bn_call_table(bs: int, repeats: int) -> list[dict[str, Any]]:
    """One batch-mode BN call on one input, three ways, as a time ratio to ``batch_norm``.

    ``batch_norm`` alone (inference mode, given statistics: what a bare forward's BN costs),
    the two-step path (the float64 reduction, then ``batch_norm`` with its result), and the
    fused call (:class:`bnfold.recalib.stats.FusedBatchNorm`, as batch mode calls it).
    """
    print(
        f"\nBatch-mode BN call ({bs} x C x S x S float32, {torch.get_num_threads()} thread(s), "
        f"{repeats} interleaved rounds; time as a ratio to batch_norm alone, lower is better)"
    )
    print(f"{'input':<22}{'batch_norm us':>15}{'two-step':>10}{'fused':>8}")
    out = []
    gen = torch.Generator().manual_seed(5)
    for channels, side in BN_CALL_SHAPES:
        shape = (bs, channels, side, side) if side > 1 else (bs, channels)
        times = _bn_call_times(torch.randn(shape, generator=gen) * 2 + 0.5, repeats)
        label = "x".join(map(str, shape))
        row = {
            "input": label,
            "batch_norm_us": min(times["bn"]) * 1e6,
            "two_step": time_ratio(times["bn"], times["two-step"]),
            "fused": time_ratio(times["bn"], times["fused"]),
        }
        print(
            f"{label:<22}{row['batch_norm_us']:>15.0f}{row['two_step']:>9.2f}x{row['fused']:>7.2f}x"
        )
        out.append(row)
    return out


def bn_context_table(bs: int, repeats: int) -> list[dict[str, Any]]:
    """The fused call where batch mode makes it: after a convolution, before a ReLU.

    A 1x1 convolution, the BN call and a ReLU run in a loop of 20, each timed on its own.
    Which core wrote which part of the BN input, and which part each core reads after it,
    matters here and not when one input is timed alone (``bn_call_table``): the fused call
    with the threads split by samples (as batch mode runs it) and by channel ranges (as it
    ran before), beside inference-mode ``batch_norm``, each as a time ratio to
    ``batch_norm``, and the ReLU after each as a ratio to the ReLU after ``batch_norm``.
    """
    from bnfold.recalib import kernels
    from bnfold.recalib.stats import FusedBatchNorm

    print(
        f"\nBN call in context: 1x1 conv -> BN -> ReLU ({bs} x C x S x S float32, "
        f"{torch.get_num_threads()} thread(s), {repeats} interleaved rounds of 20 calls; "
        "time as a ratio to batch_norm, lower is better)"
    )
    print(
        f"{'input':<18}{'batch_norm us':>14}{'fused, samples':>16}{'fused, channels':>17}"
        f"{'ReLU after, samples':>21}{'ReLU after, channels':>22}"
    )
    out = []
    gen = torch.Generator().manual_seed(6)
    for channels, side in BN_CALL_SHAPES:
        if side * side < kernels.ROW_MIN:
            continue  # short runs: the column loop, split by channels either way
        x = torch.randn(bs, channels, side, side, generator=gen)
        w = torch.randn(channels, channels, 1, 1, generator=gen) / channels**0.5
        weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels)
        mean, var = torch.zeros(channels), torch.ones(channels)
        fused = FusedBatchNorm(1e-5)
        norms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "bn": lambda h, m=mean, v=var, g=weight, b=bias: F.batch_norm(h, m, v, g, b),
            "samples": lambda h, f=fused, g=weight, b=bias: f(h, g, b)[3],
            "channels": lambda h, f=fused, g=weight, b=bias: f(h, g, b)[3],
        }
        for key, norm in norms.items():  # warm-up: compilation, first allocations
            _context_loop(x, w, norm, key != "channels")
        bn_t: dict[str, list[float]] = {k: [] for k in norms}
        relu_t: dict[str, list[float]] = {k: [] for k in norms}
        for _ in range(max(repeats, 1)):
            for key, norm in norms.items():
                t_bn, t_relu = _context_loop(x, w, norm, key != "channels")
                bn_t[key].append(t_bn)
                relu_t[key].append(t_relu)
        label = f"{bs}x{channels}x{side}x{side}"
        row = {
            "input": label,
            "batch_norm_us": min(bn_t["bn"]) / 20 * 1e6,
            "fused_samples": time_ratio(bn_t["bn"], bn_t["samples"]),
            "fused_channels": time_ratio(bn_t["bn"], bn_t["channels"]),
            "relu_samples": time_ratio(relu_t["bn"], relu_t["samples"]),
            "relu_channels": time_ratio(relu_t["bn"], relu_t["channels"]),
        }
        print(
            f"{label:<18}{row['batch_norm_us']:>14.0f}{row['fused_samples']:>15.2f}x"
            f"{row['fused_channels']:>16.2f}x{row['relu_samples']:>20.2f}x"
            f"{row['relu_channels']:>21.2f}x"
        )
        out.append(row)
    return out


def _context_loop(
    x: torch.Tensor,
    w: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
    split_samples: bool,
) -> tuple[float, float]:
    """Seconds in ``norm`` and in the ReLU after it over 20 rounds of conv -> norm -> ReLU."""
    from bnfold.recalib import kernels

    t_norm = t_relu = 0.0
    kernels.SPLIT_SAMPLES = split_samples
    try:
        with torch.no_grad():
            h = x
            for _ in range(20):
                h = F.conv2d(h, w)
                t0 = time.perf_counter()
                h = norm(h)
                t1 = time.perf_counter()
                h = F.relu(h)
                t_relu += time.perf_counter() - t1
                t_norm += t1 - t0
    finally:
        kernels.SPLIT_SAMPLES = True
    return t_norm, t_relu


def onnx_table(model_name: str, batches: int, bs: int) -> dict[str, float]:
    import onnx_graphsurgeon as gs

    model, example = build(model_name)
    proto = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: "batch"},),
        optimize=False,
        verbose=False,
    ).model_proto
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(bs, *example.shape[1:], generator=gen).numpy() for _ in range(batches)]
    t_gs = timed(lambda: gs.export_onnx(gs.import_onnx(proto)), 3)
    t_run = timed(lambda: bnfold.recalibrate(proto, data, mode="batch", progress=False), 1)
    print(f"\nONNX driver ({model_name}, {batches} batches of {bs}, mode=batch)")
    print(f"{'step':<44}{'seconds':>10}")
    print(f"{'graphsurgeon import+export (once per pass)':<44}{t_gs:>10.4f}")
    print(f"{'whole recalibration (one pass)':<44}{t_run:>10.4f}")
    return {"graphsurgeon_s": t_gs, "recalibration_s": t_run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet-mini")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--tables",
        default="errors,throughput,onnx",
        help="comma-separated subset of: errors, throughput, strategies, grid, bn-call, bn-context, "
        "onnx",
    )
    ap.add_argument(
        "--models",
        default=",".join(GRID_MODELS),
        help="comma-separated models of the grid table",
    )
    ap.add_argument(
        "--thread-list", default="1,2", help="comma-separated thread counts of the grid table"
    )
    ap.add_argument("--size", type=int, default=None, help="input spatial size (strategies)")
    ap.add_argument(
        "--no-per-level",
        action="store_true",
        help="skip the per-level passes in the strategies table (one forward per level)",
    )
    ap.add_argument(
        "--no-population",
        action="store_true",
        help="skip mode=population in the throughput table (one pass per depth level: ~50 "
        "passes on resnet50)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pin_allocator()
    tables = set(args.tables.split(","))
    if "errors" in tables:
        error_table(args.model, args.batches, args.batch_size)
    if "throughput" in tables:
        throughput_table(
            args.model, args.batches, args.batch_size, args.repeats, not args.no_population
        )
    if "strategies" in tables:
        strategies_table(
            args.model,
            args.batches,
            args.batch_size,
            args.repeats,
            args.size,
            not args.no_per_level,
        )
    if "grid" in tables:
        grid_table(
            args.models.split(","),
            [int(t) for t in args.thread_list.split(",")],
            args.batches,
            args.batch_size,
            args.repeats,
            args.size or 64,
        )
    if "bn-call" in tables:
        bn_call_table(args.batch_size, args.repeats)
    if "bn-context" in tables:
        bn_context_table(args.batch_size, args.repeats)
    if "onnx" in tables:
        onnx_table(args.model, args.batches, args.batch_size)


if __name__ == "__main__":
    main()
