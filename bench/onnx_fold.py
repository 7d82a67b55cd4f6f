"""Benchmark: ``bnfold fold`` on a ResNet-50-sized ONNX file against the I/O limit and peers.

Run as a script (peers come from the ``bench`` extra: ``pip install -e '.[bench]'``)::

    python bench/onnx_fold.py [--model resnet50] [--exporter torchscript|dynamo] [--repeat 5]

It exports a model of ``bnfold.models`` with its BatchNorms kept, then times, in this one
process and on the same file:

* the I/O limit: ``onnx.load`` + ``onnx.save`` (no fold can be faster end to end);
* a bare onnx-graphsurgeon ``import_onnx`` + ``export_onnx`` round trip (+ load/save), the
  cost a graphsurgeon-based pass pays before folding anything: the measured reason bnfold
  edits the ``ModelProto`` through an index instead;
* ``bnfold fold`` end to end (load, fold, atomic save), and the fold alone in memory;
* onnxruntime's basic-level graph optimization (session creation writing the optimized
  model), onnxoptimizer's ``fuse_bn_into_conv`` and the onnxscript BatchNorm rewrite rules,
  each end to end (load + pass + save) and in memory.

For each it reports the best time over ``--repeat`` runs, the ratio to the I/O limit, the
BatchNormalization nodes left, and whether onnxruntime loads the output. The target for
bnfold is <= 1.5x the I/O limit.

``--patterns`` instead folds small networks with the patterns that need a fold *through* an
operation (Conv -> Add(constant) -> BN, a channel Concat -> BN, LeViT's Linear -> Reshape ->
BN -> Reshape, BN -> average pool -> Flatten -> Gemm, and a DenseNet-style Concat whose input
is reused, which must stay), exported with ``torch.onnx.export(dynamo=True)``, with bnfold and
every peer that is installed (onnxsim and onnxslim too, outside the ``bench`` extra), and
prints the BNs each leaves and its max relative error against the unfolded model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import best_time as _best


def _bn_left(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _loads(path: Path) -> bool:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def export(name: str, exporter: str, path: Path) -> None:
    """Export a registered model with every BN kept (no exporter-side folding)."""
    import torch

    from bnfold.models import build

    module, example = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (example,), str(path), dynamo=True, optimize=False)
        else:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, do_constant_folding=False
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a bnfold.models name")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--file", type=Path, help="use this .onnx file instead of exporting")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from bnfold.onnxfold import fold_file, fold_onnx

    console = Console(width=110)
    work = Path(tempfile.mkdtemp(prefix="bnfold-bench-"))
    src = args.file
    if src is None:
        src = work / f"{args.model}.onnx"
        console.print(f"exporting {args.model} ({args.exporter}) ...")
        export(args.model, args.exporter, src)
    size_mb = src.stat().st_size / 1e6
    bns = _bn_left(src)
    console.print(f"{src}: {size_mb:.1f} MB, {bns} BatchNormalization nodes")

    rows: list[tuple[str, float, float | None, Path | None]] = []

    def io_limit() -> None:
        onnx.save(onnx.load(str(src)), str(work / "io.onnx"))

    limit = _best(io_limit, args.repeat)
    rows.append(("onnx.load + onnx.save (I/O limit)", limit, None, work / "io.onnx"))

    out = work / "bnfold.onnx"
    e2e = _best(lambda: fold_file(src, out), args.repeat)
    loaded = [onnx.load(str(src)) for _ in range(args.repeat)]
    it = iter(loaded)
    mem = _best(lambda: fold_onnx(next(it), inplace=True), args.repeat)
    rows.append(("bnfold fold", e2e, mem, out))

    try:
        import onnx_graphsurgeon as gs

        def gs_e2e() -> None:
            graph = gs.import_onnx(onnx.load(str(src)))
            onnx.save(gs.export_onnx(graph), str(work / "graphsurgeon.onnx"))

        models_gs = [onnx.load(str(src)) for _ in range(args.repeat)]
        it_gs = iter(models_gs)
        gs_mem = _best(lambda: gs.export_onnx(gs.import_onnx(next(it_gs))), args.repeat)
        # No fold at all: what an onnx-graphsurgeon based pass pays before folding anything.
        rows.append(
            (
                "onnx-graphsurgeon import+export only",
                _best(gs_e2e, args.repeat),
                gs_mem,
                work / "graphsurgeon.onnx",
            )
        )
    except ImportError:
        console.print("onnx-graphsurgeon missing: skipped")

    try:
        import onnxruntime as ort

        def ort_basic() -> None:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(work / "ort.onnx")
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])

        rows.append(
            (
                "onnxruntime basic optimization",
                _best(ort_basic, args.repeat),
                None,
                work / "ort.onnx",
            )
        )
    except ImportError:
        console.print("onnxruntime missing: skipped")

    try:
        import onnxoptimizer

        def opt_e2e() -> None:
            m = onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"])
            onnx.save(m, str(work / "onnxoptimizer.onnx"))

        models = [onnx.load(str(src)) for _ in range(args.repeat)]
        it2 = iter(models)
        opt_mem = _best(
            lambda: onnxoptimizer.optimize(next(it2), ["fuse_bn_into_conv"]), args.repeat
        )
        rows.append(
            (
                "onnxoptimizer fuse_bn_into_conv",
                _best(opt_e2e, args.repeat),
                opt_mem,
                work / "onnxoptimizer.onnx",
            )
        )
    except ImportError:
        console.print("onnxoptimizer missing (pip install -e '.[bench]'): skipped")

    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        rules = _fuse_batchnorm.rules

        def script_e2e() -> None:
            m = rewriter.rewrite(onnx.load(str(src)), pattern_rewrite_rules=rules)
            onnx.save(m, str(work / "onnxscript.onnx"))

        models3 = [onnx.load(str(src)) for _ in range(args.repeat)]
        it3 = iter(models3)
        script_mem = _best(
            lambda: rewriter.rewrite(next(it3), pattern_rewrite_rules=rules), args.repeat
        )
        rows.append(
            (
                "onnxscript BN rewrite rules",
                _best(script_e2e, args.repeat),
                script_mem,
                work / "onnxscript.onnx",
            )
        )
    except ImportError:
        console.print("onnxscript missing: skipped")

    table = Table(
        title=f"BN folding of {src.name} ({size_mb:.0f} MB, {bns} BNs), best of {args.repeat}"
    )
    for col in ("tool", "end to end ms", "x I/O limit", "in memory ms", "BNs left", "ORT loads"):
        table.add_column(col, justify="left" if col == "tool" else "right")
    for name, t, in_mem, path in rows:
        table.add_row(
            name,
            f"{t * 1e3:.0f}",
            f"{t / limit:.2f}",
            "" if in_mem is None else f"{in_mem * 1e3:.0f}",
            str(_bn_left(path)) if path and path.exists() else "?",
            ("yes" if _loads(path) else "NO") if path and path.exists() else "?",
        )
    console.print(table)
    ratio = e2e / limit
    verdict = "meets" if ratio <= 1.5 else "misses"
    console.print(f"bnfold end to end: {ratio:.2f}x the I/O limit ({verdict} the 1.5x target)")


# ---- --patterns ----------------------------------------------------------------------------


def _pattern_modules() -> dict[str, tuple[object, object]]:
    """Small networks, one per pattern, with non-trivial BN statistics, and example inputs."""
    from bnfold.models.patterns import pattern_nets

    return dict(pattern_nets(width=2))  # type: ignore[arg-type]


def _peers() -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto] | None]:
    """Each peer's fold as ``ModelProto -> ModelProto``, or None when it is not installed.

    The passes are the suite's (:mod:`bench.onnx_peers`), plus onnxscript's BatchNorm rules
    on their own (the suite runs its whole optimizer).
    """
    from bench import onnx_peers

    def rules() -> Callable[[onnx.ModelProto], onnx.ModelProto]:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        return lambda m: rewriter.rewrite(m, pattern_rewrite_rules=_fuse_batchnorm.rules)

    makers = {
        "onnxruntime basic": onnx_peers._ort_basic,
        "onnxoptimizer": onnx_peers._onnxoptimizer,
        "onnxscript rules": rules,
        "onnxsim": onnx_peers._onnxsim,
        "onnxslim": onnx_peers._onnxslim,
    }
    peers: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto] | None] = {}
    for name, make in makers.items():
        try:
            peers[name] = make()
        except ImportError:
            peers[name] = None
    return peers


def _run(m: onnx.ModelProto, feeds: dict[str, object]) -> list[object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)  # type: ignore[arg-type]


def patterns() -> None:
    """The ``--patterns`` table: BNs left (and max relative error) per network and tool."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from bnfold.onnxfold import fold_onnx

    console = Console(width=150)
    tools = {"bnfold": lambda m: fold_onnx(m)[0], **_peers()}
    table = Table(title="BNs left after folding (max relative error vs the unfolded model)")
    table.add_column("pattern")
    table.add_column("BNs", justify="right")
    for name in tools:
        table.add_column(name, justify="right")
    for label, (net, example) in _pattern_modules().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (example,), dynamo=True, verbose=False)
        assert program is not None
        model = program.model_proto
        feeds = {model.graph.input[0].name: example.numpy()}  # type: ignore[attr-defined]
        expected = _run(model, feeds)
        row = [label, str(sum(n.op_type == "BatchNormalization" for n in model.graph.node))]
        for fold in tools.values():
            if fold is None:
                row.append("not installed")
                continue
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            try:
                out = fold(copy)
                got = _run(out, feeds)
            except Exception as e:  # a peer that fails on a pattern is a result, too
                row.append(f"fails ({type(e).__name__})")
                continue
            err = max(
                float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                / max(float(np.max(np.abs(np.asarray(a, np.float64)))), 1e-30)
                for a, b in zip(expected, got, strict=True)
            )
            left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
            row.append(f"{left} ({err:.1e})")
        table.add_row(*row)
    console.print(table)
    console.print("onnxruntime basic folds in its session; its saved model shows what it kept.")


if __name__ == "__main__":
    import sys

    if "--patterns" in sys.argv:
        patterns()
    else:
        main()
