"""Recalibrate the BatchNorms of a PyTorch model from data, exactly.

Every BatchNorm's input, all of it, is fed to a float64 accumulator
(:mod:`bnfold.recalib.stats`). Everything else runs in eval mode: dropout is off and no buffer
is touched by the forward itself. A module called at several sites (a shared BN) has one
accumulator, so all its calls are pooled. The pieces: :mod:`~bnfold.recalib.torch_sites`
(which BNs, their buffers), :mod:`~bnfold.recalib.levels` (depth levels from a probe forward),
:mod:`~bnfold.recalib.passes` (passes observed through module hooks),
:mod:`~bnfold.recalib.frontier_plan` / :mod:`~bnfold.recalib.frontier_run` /
:mod:`~bnfold.recalib.frontier_store` (population mode at the cost of about one forward).

Modes — what the *upstream* BNs use while a downstream BN is being measured:

``"population"`` (the default)
    Upstream BNs normalise with their *new* population statistics, exactly as at inference.
    BNs are measured level by level and a level's statistics are written before the next level
    is measured. When the model can be captured (torch.fx, or a GraphModule as given), each
    layer runs once per sample: the activations crossing a level boundary are kept between
    passes (strategy ``"frontier"``, within ``data_cache_mb``, then spilled, then recomputed).
    Otherwise each level is one forward over the data, stopping after its deepest BN
    (``"per-level"``). Both give the same bits. This is the default because it is the only
    mode whose result is independent of batch size and order for a network with more than one
    BN, and because it gives each BN the distribution it will see when deployed (and folded).

``"batch"``
    Every BN normalises with the statistics of the current batch, as in training (what
    ``torch.optim.swa_utils.update_bn`` and precise-BN tools do). One pass, so it is the
    fastest, but for a downstream BN the data it sees depends on the batch size.

Covered models: any ``nn.Module`` with ``nn.BatchNorm1d/2d/3d``/``SyncBatchNorm`` modules
(also inside a ``torch.fx.GraphModule`` as ``call_module`` nodes), and ``torch.fx.GraphModule``
nodes calling ``torch.ops.aten.batch_norm.default`` or ``torch.nn.functional.batch_norm`` with
``get_attr`` running buffers in inference mode (what ``ExportedProgram.module()`` contains).
An ``ExportedProgram`` is recalibrated through ``ep.module()``; the result is that GraphModule.

Safety: the BN buffers are snapshotted first; if the data, the model or a check fails midway,
every buffer is restored and the train/eval flags are put back, so the caller's model is never
left half-updated. On success the model is updated in place (``inplace=False`` works on a
deep copy instead). NaN/Inf activations stop the run naming the first BN that received them.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bnfold.errors import BadInputError, RecalibrationError
from bnfold.recalib.data import _clone, cast_for_model, iter_budget, to_device
from bnfold.recalib.dist import dist_sum, dist_world
from bnfold.recalib.frontier_plan import FrontierPlan, plan_frontier
from bnfold.recalib.frontier_run import FrontierRun, model_inputs, run_pre_hooks
from bnfold.recalib.frontier_store import FrontierStore
from bnfold.recalib.levels import measure_levels
from bnfold.recalib.options import Options
from bnfold.recalib.passes import run_pass
from bnfold.recalib.progress import PassProgress
from bnfold.recalib.report import BNStats, RecalibrationReport
from bnfold.recalib.stats import Scratch, all_reduce_stats
from bnfold.recalib.torch_sites import (
    FunctionalBatchNorm,
    Site,
    discover_sites,
    model_device,
    report_entry,
    restore,
    snapshot,
    write_stats,
)

__all__ = ["recalibrate_torch"]

_MIB = 2**20


def _check_nonempty(batches: int, dev: torch.device | None) -> None:
    if dist_sum(batches, dev or torch.device("cpu")) == 0:
        raise RecalibrationError(
            "the data yielded no batch; pass a non-empty loader (or a larger "
            "num_samples/num_batches budget)"
        )


def _finish_group(group: list[Site]) -> None:
    all_reduce_stats([s.acc for s in group])
    for s in group:
        if s.acc.count:
            write_stats(s)


def _batch_mode(
    runner: nn.Module,
    sites: list[Site],
    data: Iterable[Any],
    options: Options,
    dev: torch.device | None,
    bar: PassProgress,
    report: RecalibrationReport,
) -> None:
    for s in sites:
        if not s.normalises_itself:
            s.set_batch_stats(True)
        s.active = True
    report.batches, report.samples = run_pass(
        runner,
        sites,
        data,
        options=options,
        device=dev,
        scratch=Scratch(),
        progress=bar,
        description="recalibrating (one pass)",
    )
    _check_nonempty(report.batches, dev)
    all_reduce_stats([s.acc for s in sites])
    report.passes = 1
    report.strategy = "one-pass"
    for s in sites:
        s.set_batch_stats(False)
        s.level = 1
        if s.acc.count:
            write_stats(s)


def _population_mode(
    model: nn.Module,
    runner: nn.Module,
    sites: list[Site],
    data: Iterable[Any],
    options: Options,
    dev: torch.device | None,
    bar: PassProgress,
    report: RecalibrationReport,
) -> None:
    stream = iter_budget(data, num_samples=options.num_samples, num_batches=options.num_batches)
    first = next(stream, None)
    probe = None if first is None else to_device(_clone(first), dev)
    levels, calls = measure_levels(runner, sites, probe, options.forward_fn)
    for s, lv in zip(sites, levels, strict=True):
        s.level = lv
    groups = [[s for s in sites if s.level == lv] for lv in sorted(set(levels))]
    report.passes = len(groups)
    started = itertools.chain([] if first is None else [first], stream)
    plan: FrontierPlan | str = "strategy='per-level' was asked for"
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    if options.strategy == "auto":
        plan = plan_frontier(model, runner, sites, levels, calls)
    if not isinstance(plan, str) and probe is not None:
        try:
            inputs = model_inputs(probe, options.forward_fn)
        except Exception as e:
            inputs = None
            plan = f"the batch does not bind to the graph's inputs ({type(e).__name__})"
    if not isinstance(plan, str) and inputs is not None:
        inputs = run_pre_hooks(plan.caller, *inputs)
        try:
            plan.bind(*inputs)
        except Exception as e:
            # e.g. a forward_fn that reaches into the model's attributes
            plan = f"the batch does not bind to the graph's inputs ({type(e).__name__})"
    if isinstance(plan, str):
        report.strategy, report.strategy_note = "per-level", plan
        replay = options.replayable(data, started)
        scratch = Scratch()
        for k, group in enumerate(groups):
            for s in sites:
                s.active = s in group
            batches, samples = run_pass(
                runner,
                sites,
                replay,
                options=options,
                device=dev,
                scratch=scratch,
                progress=bar,
                description=f"recalibrating (pass {k + 1}/{len(groups)})",
            )
            if k == 0:
                report.batches, report.samples = batches, samples
                _check_nonempty(batches, dev)
            _finish_group(group)
        return
    report.strategy = "frontier"
    scratch = Scratch()
    with FrontierStore(options.cache_bytes, options.spill_bytes) as store:
        run = FrontierRun(plan, sites, data, store, options=options, device=dev)
        for k, group in enumerate(groups, start=1):
            if k <= plan.passes:
                run.run_pass(k, started if k == 1 else None, scratch, bar)
            if k == 1:
                report.batches, report.samples = run.counts.batches, run.counts.samples
                _check_nonempty(report.batches, dev)
            _finish_group(group)
        stats = store.stats
    report.peak_memory_mb = stats.peak_memory / _MIB
    report.peak_spill_mb = stats.peak_disk / _MIB
    report.recomputed_segments = run.counts.recomputed
    where = [f"peak {report.peak_memory_mb:.1f} MiB kept in memory"]
    if stats.peak_disk:
        where.append(f"{report.peak_spill_mb:.1f} MiB spilled to a memory-mapped temp file")
    if run.counts.recomputed:
        where.append(f"{run.counts.recomputed} batch segment(s) recomputed for lack of room")
    report.strategy_note = ", ".join(where)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            return p.dtype
    return None


def recalibrate_torch(
    model: Any, data: Iterable[Any], options: Options | None = None
) -> RecalibrationReport:
    """Recalibrate a torch model; see :func:`bnfold.recalibrate` for the options."""
    options = options or Options()
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    elif not isinstance(model, nn.Module):
        raise BadInputError(
            f"cannot recalibrate a {type(model).__name__}; pass an nn.Module, a GraphModule, an "
            "ExportedProgram or an ONNX model"
        )
    elif not options.inplace:
        model = copy.deepcopy(model)
    runner, sites, stateless = discover_sites(model, options.estimator)
    if not sites:
        raise BadInputError(
            "the model has no BatchNorm with running statistics; nothing to recalibrate"
        )
    dev = torch.device(options.device) if options.device is not None else model_device(model)
    data = cast_for_model(data, _float_dtype(model))
    snapshot(sites)
    flags = {m: m.training for m in model.modules()}
    tracking = {
        s.module: s.module.track_running_stats
        for s in sites
        if hasattr(s.module, "track_running_stats")
    }
    report = RecalibrationReport(
        model=model,
        framework="torch",
        mode=options.mode,
        estimator=options.estimator,
        world_size=dist_world(),
    )
    try:
        # flags set directly (ExportedProgram.module() refuses eval()), and only where they
        # change: an assignment goes through nn.Module.__setattr__, a few us per module
        for m, training in flags.items():
            if training:
                m.training = False
        if runner is not model:
            for m in runner.modules():
                if m.training:
                    m.training = False
        with PassProgress(options.progress) as bar:
            if options.mode == "batch":
                _batch_mode(runner, sites, data, options, dev, bar, report)
            else:
                _population_mode(model, runner, sites, data, options, dev, bar, report)
    except BaseException:
        restore(sites)
        raise
    finally:
        for m, t in tracking.items():
            m.track_running_stats = t
        for m, training in flags.items():
            if m.training != training:
                m.training = training
        for s in sites:
            if isinstance(s.module, FunctionalBatchNorm):
                s.module.use_batch_stats = False
    for s in sites:
        report.bns.append(report_entry(s))
    for name in stateless:
        report.bns.append(BNStats(name=name, status="no-running-stats", channels=0))
    return report
