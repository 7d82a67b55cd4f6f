"""ONNX BatchNorm folding: bnfold beside every installed peer, on the same exported file.

For one model (exported with its BNs kept) and each tool, :func:`coverage` measures

* coverage: BatchNormalization nodes found, folded and left (bnfold gives a reason per BN
  left; peers give none), and the nodes the output has beyond the same network exported
  without BN (a peer that folds by emitting ``Sqrt``/``Div``/``Mul`` nodes computes the fold at
  run time, on every inference);
* validity: an output that ``onnx.checker`` (full check) rejects, or that onnxruntime refuses
  to load or run, is counted *invalid*, never as a fold;
* max relative error of the output against the PyTorch network run in float64 (onnxruntime
  with graph optimizations off, so the tool's own graph is what runs);
* pass time end to end (load, pass, save) as a ratio to ``onnx.load`` + ``onnx.save``;
* latency at one thread, onnxruntime with ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``, as a
  ratio to the original model, next to the no-BN network (the limit a fold can reach).

A peer that is not installed is reported ``not installed``; one that raises is reported with
its exception, and the suite goes on.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import common

Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


@dataclass(frozen=True)
class Peer:
    """An ONNX graph pass that may fold BatchNorms.

    Attributes:
        name: as shown in the tables.
        module, distribution: what must import (and its version) for the peer to run.
        make: returns the pass (imports lazily, so a missing peer never breaks the suite).
    """

    name: str
    module: str
    distribution: str | None
    make: Callable[[], Pass]


def _bnfold() -> Pass:
    import bnfold

    return lambda m: bnfold.fold(m)[0]


def _ort_basic() -> Pass:
    """onnxruntime's own Conv+BN fusion (basic level), written out as a model."""

    def run(m: onnx.ModelProto) -> onnx.ModelProto:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(Path(tmp) / "ort.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(str(Path(tmp) / "ort.onnx"))

    return run


def _onnxoptimizer() -> Pass:
    import onnxoptimizer

    return lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])


def _onnxsim() -> Pass:
    import onnxsim

    return lambda m: onnxsim.simplify(m)[0]


def _onnxslim() -> Pass:
    import onnxslim

    return lambda m: onnxslim.slim(m)


def _onnxscript() -> Pass:
    """The optimizer ``torch.onnx.export(dynamo=True)`` runs by default."""
    import onnxscript.optimizer

    return lambda m: onnxscript.optimizer.optimize(m)


def _polygraphy() -> Pass:
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    return lambda m: fold_constants(m, error_ok=False)


PEERS: list[Peer] = [
    Peer("bnfold", "bnfold", "bnfold", _bnfold),
    Peer("onnxruntime basic fusion", "onnxruntime", "onnxruntime", _ort_basic),
    Peer("onnxoptimizer fuse_bn_into_conv", "onnxoptimizer", "onnxoptimizer", _onnxoptimizer),
    Peer("onnxsim simplify", "onnxsim", "onnxsim", _onnxsim),
    Peer("onnxslim slim", "onnxslim", "onnxslim", _onnxslim),
    Peer("onnxscript optimizer", "onnxscript", "onnxscript", _onnxscript),
    Peer("polygraphy fold_constants", "polygraphy", "polygraphy", _polygraphy),
]


def count_bn(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def validity(m: onnx.ModelProto, x: np.ndarray) -> tuple[str, np.ndarray | None]:
    """('ok', output) or ('invalid: why', None): full checker, then onnxruntime load + run."""
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        return f"invalid: onnx.checker ({type(e).__name__})", None
    try:
        sess = common.ort_session(m.SerializeToString(), "disable")
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as e:
        return f"invalid: onnxruntime refuses ({type(e).__name__})", None
    return "ok", np.asarray(out)


def coverage(
    model_name: str,
    module: Any,
    example: Any,
    limit_module: Any,
    *,
    exporter: str = "torchscript",
    repeat: int = 3,
    latency_rounds: int = 20,
) -> dict[str, Any]:
    """bnfold and every ONNX peer on one network; see the module docstring for the figures."""
    import torch

    src = common.export_onnx_keep_bn(module, example, exporter)
    limit = common.export_onnx_keep_bn(limit_module, example, exporter)
    x = example.numpy()
    with torch.no_grad():
        ref = copy.deepcopy(module).double()(example.double()).numpy()
    found = count_bn(src)
    work = Path(tempfile.mkdtemp(prefix="bnfold-suite-"))
    src_path = work / "src.onnx"
    onnx.save(src, str(src_path))

    def io() -> None:
        onnx.save(onnx.load(str(src_path)), str(work / "io.onnx"))

    io_time = common.best_time(io, repeat)
    _, orig_out = validity(src, x)
    rows: list[dict[str, Any]] = []
    outputs: dict[str, onnx.ModelProto] = {"original": src, "no-BN (limit)": limit}
    for peer in PEERS:
        row: dict[str, Any] = {"tool": peer.name, "bn_found": found}
        version = common.installed(peer.module, peer.distribution)
        if version is None:
            rows.append({**row, "status": "not installed"})
            continue
        row["version"] = version
        try:
            run = peer.make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = run(copy.deepcopy(src))

                def e2e(run: Pass = run) -> None:
                    onnx.save(run(onnx.load(str(src_path))), str(work / "out.onnx"))

                seconds = common.best_time(e2e, repeat)
        except Exception as e:
            rows.append({**row, "status": f"raised {type(e).__name__}: {str(e)[:80]}"})
            continue
        left = count_bn(out)
        row.update(
            bn_left=left,
            bn_folded=found - left,
            extra_nodes=len(out.graph.node) - len(limit.graph.node),
            pass_ratio=seconds / io_time,
        )
        if peer.name == "bnfold":
            report = __import__("bnfold").fold(copy.deepcopy(src))[1]
            row["reasons"] = report.summary()["skipped_by_code"]
        status, y = validity(out, x)
        row["status"] = status
        if y is not None:
            row["max_rel_err"] = common.rel_err(ref, y)
            outputs[peer.name] = out
        rows.append(row)
    latency = _latency(outputs, x, latency_rounds)
    for row in rows:
        row.update(latency.get(row["tool"], {}))
    return {
        "model": model_name,
        "exporter": exporter,
        "bn_found": found,
        "io_ms": io_time * 1e3,
        "original_max_rel_err": None if orig_out is None else common.rel_err(ref, orig_out),
        "latency": latency,
        "tools": rows,
    }


def _latency(outputs: dict[str, onnx.ModelProto], x: np.ndarray, rounds: int) -> dict[str, Any]:
    """Per model variant: ms and ratio to the original, ORT_DISABLE_ALL and ORT_ENABLE_ALL."""
    result: dict[str, dict[str, float]] = {k: {} for k in outputs}
    for level, tag in (("disable", "ort_disable"), ("all", "ort_enable")):
        runs: dict[str, Callable[[], object]] = {}
        for name, m in outputs.items():
            try:
                sess = common.ort_session(m.SerializeToString(), level)
            except Exception:
                continue
            feed = {sess.get_inputs()[0].name: x}
            runs[name] = lambda s=sess, f=feed: s.run(None, f)
        times = common.interleaved(runs, rounds, warmup=2)
        ms = common.medians_ms(times)
        for name in times:
            result[name][f"{tag}_ms"] = ms[name]
            result[name][f"{tag}_ratio"] = common.time_ratio(times["original"], times[name])
    return result
