"""Cost of ``bnfold.verify`` next to the bare onnxruntime runs it needs.

A verification needs two onnxruntime sessions (the original with graph optimizations off, the
folded model with them on) and a run of each on every batch. Everything else ``verify`` does
(reading input types, generating inputs, statistics, the report) is overhead; this script
measures it side by side in one process, alternating the two, on a ResNet-50-sized model
from ``bnfold.models`` exported to ONNX and folded with ``bnfold.fold``.

    python bench/verify.py [--model resnet50] [--batches 8] [--batch-size 1] [--repeats 3]

Prints the median wall time of each and their ratio (the target is at most 1.5x), and the
errors ``verify`` measured, so the numbers behind a claim come from one run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import bnfold
from bnfold.models import build
from bnfold.onnx_io import save_onnx


def export_onnx(name: str, batch_size: int, folder: Path) -> tuple[Path, Path, tuple[int, ...]]:
    """Export ``name`` with its BatchNorms kept, fold it with bnfold; return both paths."""
    module, example = build(name)
    shape = (batch_size, *example.shape[1:])
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.zeros(shape),),
        buf,
        dynamo=False,
        do_constant_folding=False,  # keep BatchNormalization nodes for bnfold to fold
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    original = onnx.load_from_string(buf.getvalue())
    folded, report = bnfold.fold(original)
    orig_path, fold_path = folder / "original.onnx", folder / "folded.onnx"
    save_onnx(original, orig_path)
    save_onnx(folded, fold_path)
    print(f"{name}: {report}")
    return orig_path, fold_path, shape


def bare_onnxruntime(orig: Path, folded: Path, batches: list[np.ndarray]) -> float:
    """The two sessions and runs a verification cannot avoid, with nothing around them."""
    t0 = time.perf_counter()
    ref_opts = ort.SessionOptions()
    ref_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(orig), ref_opts, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(
        str(folded), ort.SessionOptions(), providers=["CPUExecutionProvider"]
    )
    for x in batches:
        ref.run(None, {"input": x})
        cand.run(None, {"input": x})
    return time.perf_counter() - t0


def bnfold_verify(orig: Path, folded: Path, n: int, shape: tuple[int, ...]) -> tuple[float, object]:
    t0 = time.perf_counter()
    report = bnfold.verify(
        orig, folded, num_batches=n, shapes={"input": shape}, seed=0, progress=False
    )
    return time.perf_counter() - t0, report


def measure(model: str, n_batches: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Median seconds of the bare onnxruntime work and of ``bnfold.verify``, alternated."""
    with tempfile.TemporaryDirectory() as tmp:
        orig, folded, shape = export_onnx(model, batch_size, Path(tmp))
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(n_batches)]
        bare_times, verify_times = [], []
        report: Any = None
        # Warm-up (page cache, lazy library loads), then alternate so drift hits both alike.
        bare_onnxruntime(orig, folded, batches[:1])
        for _ in range(repeats):
            bare_times.append(bare_onnxruntime(orig, folded, batches))
            t, report = bnfold_verify(orig, folded, n_batches, shape)
            verify_times.append(t)
    bare, ver = statistics.median(bare_times), statistics.median(verify_times)
    stats = [o for p in report.providers for o in p.outputs]
    return {
        "model": model,
        "shape": list(shape),
        "batches": n_batches,
        "bare_s": bare,
        "verify_s": ver,
        "ratio": ver / bare,
        "passed": bool(report.passed),
        "max_abs": max(o.max_abs for o in stats),
        "sqnr_db": min(o.sqnr_db for o in stats),
        "report": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    result = measure(args.model, args.batches, args.batch_size, args.repeats)
    bare, ver, report = result["bare_s"], result["verify_s"], result["report"]
    shape = tuple(result["shape"])
    print()
    print(
        f"{args.model}, {args.batches} batches of {'x'.join(map(str, shape))}, CPU, "
        f"median of {args.repeats}"
    )
    print(f"{'what':<44} {'seconds':>9} {'ratio':>7}")
    print(f"{'onnxruntime: 2 sessions + 2 runs per batch':<44} {bare:>9.3f} {1.0:>7.2f}")
    print(f"{'bnfold.verify (same work + inputs, stats)':<44} {ver:>9.3f} {ver / bare:>7.2f}")
    print(f"target: ratio <= 1.5 -> {'met' if ver / bare <= 1.5 else 'NOT met'}")
    print()
    print(report)
    for p in report.providers:  # type: ignore[attr-defined]
        for o in p.outputs:
            print(
                f"  {p.provider}/{o.output}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, "
                f"max ULP {o.max_ulp:.0f}, SQNR {o.sqnr_db:.1f} dB, cosine {o.cosine:.12f}, "
                f"rtol {o.rtol:g}, atol {o.atol:.3g}"
            )


if __name__ == "__main__":
    main()
