"""Recalibrate the BatchNorms of a PyTorch model from data, exactly.

Every BatchNorm module gets a forward pre-hook that feeds its input, all of it, to a float64
accumulator (:mod:`bnfold.recalib.stats`). Everything else runs in eval mode: dropout is off
and no buffer is touched by the forward itself. A module called at several sites (a shared
BN) has one accumulator, so all its calls are pooled.

Modes — what the *upstream* BNs use while a downstream BN is being measured:

``"population"`` (the default)
    Upstream BNs normalise with their *new* population statistics, exactly as at inference.
    BNs are measured level by level: level 1 holds the BNs with no BN upstream, level ``k`` the
    BNs whose deepest upstream BN is on level ``k - 1``; one pass over the data per level, and
    a level's statistics are written before the next level is measured. The levels come from
    one probe forward on two samples of the first batch with autograd: each BN output is
    replaced by a fresh leaf tensor, and a BN depends on every BN whose leaf reaches its input.
    If the probe cannot run (or the dependencies form a cycle through a reused module), BNs are
    measured one per pass in call order, which is always correct. This is the default because
    it is the only mode whose result is independent of batch size and order for a network with
    more than one BN, and because it gives each BN the distribution it will see when the model
    is deployed (and folded).

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

import contextlib
import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.errors import BadInputError, RecalibrationError
from bnfold.recalib.data import ForwardFn, _truncate, batch_size, call_model, iter_budget, to_device
from bnfold.recalib.options import Options
from bnfold.recalib.report import BNStats, RecalibrationReport
from bnfold.recalib.stats import (
    ChannelStats,
    Scratch,
    Vector,
    all_reduce_stats,
    make_accumulator,
    moments,
)

__all__ = ["recalibrate_torch"]

_FUNCTIONAL_BN = (torch.ops.aten.batch_norm.default, F.batch_norm)
# BN types whose forward is exactly F.batch_norm: their batch-mode normalisation can reuse
# bnfold's moments
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _FunctionalBatchNorm(nn.Module):
    """Stands in for a functional batch_norm node of a GraphModule so hooks can observe it.

    Takes ``(input, weight, bias, running_mean, running_var)``; normalises with the running
    buffers (inference) or, when ``use_batch_stats`` is set, with the batch statistics.
    """

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.use_batch_stats = False

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
    ) -> torch.Tensor:
        if self.use_batch_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, self.eps)


#: What a site observes: a BN module of the model, or the stand-in for a functional BN node.
_BNModule = nn.modules.batchnorm._BatchNorm | _FunctionalBatchNorm


@dataclass(eq=False)
class _Site:
    """One BatchNorm to recalibrate: the module observed and the buffers written."""

    name: str
    module: _BNModule
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor | None
    acc: ChannelStats
    level: int = 1
    active: bool = False
    samples: int = 0
    old_mean: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    old_var: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    old_nbt: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.running_mean.numel()

    @property
    def normalises_itself(self) -> bool:
        """Whether batch mode can normalise with bnfold's moments (the forward is batch_norm)."""
        return isinstance(self.module, _FunctionalBatchNorm) or type(self.module) in _PLAIN_BN

    def set_batch_stats(self, on: bool) -> None:
        m = self.module
        if isinstance(m, _FunctionalBatchNorm):
            m.use_batch_stats = on
        else:
            # training=True with track_running_stats=False: batch statistics, no buffer update
            m.training = on
            m.track_running_stats = not on


def _bn_modules(
    model: nn.Module,
) -> tuple[
    list[tuple[str, nn.modules.batchnorm._BatchNorm, torch.Tensor, torch.Tensor]], list[str]
]:
    """BN modules with running statistics (with those buffers), and the names of those without."""
    found: list[tuple[str, nn.modules.batchnorm._BatchNorm, torch.Tensor, torch.Tensor]] = []
    stateless: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is None or m.running_var is None:
                stateless.append(name)
            else:
                found.append((name, m, m.running_mean, m.running_var))
    return found, stateless


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _rewrite_functional(
    gm: torch.fx.GraphModule,
) -> tuple[
    torch.fx.GraphModule, list[tuple[str, _FunctionalBatchNorm, torch.Tensor, torch.Tensor]]
]:
    """A GraphModule sharing ``gm``'s tensors with functional BN nodes as observable modules."""
    graph = copy.deepcopy(gm.graph)
    found: list[tuple[str, _FunctionalBatchNorm, torch.Tensor, torch.Tensor, str]] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONAL_BN:
            continue
        if node.target is F.batch_norm:
            a = list(node.args) + [None] * 8
            x, rm, rv = (
                a[0],
                node.kwargs.get("running_mean", a[1]),
                node.kwargs.get("running_var", a[2]),
            )
            w, b = node.kwargs.get("weight", a[3]), node.kwargs.get("bias", a[4])
            training = node.kwargs.get("training", a[5] or False)
            eps = node.kwargs.get("eps", a[7] if a[7] is not None else 1e-5)
        else:
            x, w, b, rm, rv, training, _momentum, eps = node.args[:8]
        if training or not all(
            isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in (rm, rv)
        ):
            continue
        mean_t, var_t = _attr(gm, rm.target), _attr(gm, rv.target)
        name = (
            rm.target[: -len(".running_mean")] if rm.target.endswith(".running_mean") else node.name
        )
        sub = _FunctionalBatchNorm(float(eps))
        sub_name = f"_bnfold_recalib_{len(found)}"
        with graph.inserting_before(node):
            new = graph.call_module(sub_name, (x, w, b, rm, rv))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        found.append((name, sub, mean_t, var_t, sub_name))
    if not found:
        return gm, []
    # a dict root: the new GraphModule references gm's own tensors and modules, so writing a
    # buffer of the runner writes the caller's buffer, and gm itself gains no submodule
    root: dict[str, Any] = {sub_name: sub for _n, sub, _m, _v, sub_name in found}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module") and n.target not in root:
            root[n.target] = _attr(gm, n.target)
    runner = torch.fx.GraphModule(root, graph)
    return runner, [(n, s, m, v) for n, s, m, v, _ in found]


def _sites(model: nn.Module, estimator: str) -> tuple[nn.Module, list[_Site], list[str]]:
    runner = model
    functional: list[tuple[str, _FunctionalBatchNorm, torch.Tensor, torch.Tensor]] = []
    if isinstance(model, torch.fx.GraphModule):
        runner, functional = _rewrite_functional(model)
    mods, stateless = _bn_modules(model)
    sites = []
    for name, m, rm, rv in mods:
        acc = make_accumulator(estimator, rm.numel(), rm.device)
        sites.append(_Site(name, m, rm, rv, m.num_batches_tracked, acc))
    for name, sub, rm, rv in functional:
        nbt_name = f"{name}.num_batches_tracked"
        try:
            nbt = _attr(model, nbt_name)
        except AttributeError:
            nbt = None
        if not isinstance(nbt, torch.Tensor):
            nbt = None
        acc = make_accumulator(estimator, rm.numel(), rm.device)
        sites.append(_Site(name, sub, rm, rv, nbt, acc))
    return runner, sites, stateless


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _round_like(x64: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 -> ``like``'s dtype with one correct rounding (bf16/fp16 via ``round_to``)."""
    if like.dtype in (torch.float64, torch.float32):
        return x64.to(like.dtype)
    from bnfold.foldmath import round_to

    arr = x64.detach().cpu().numpy()
    if like.dtype == torch.bfloat16:
        import ml_dtypes

        f32 = round_to(arr, ml_dtypes.bfloat16).astype(np.float32)
        return torch.from_numpy(f32).to(torch.bfloat16)
    if like.dtype == torch.float16:
        return torch.from_numpy(round_to(arr, np.float16))
    return x64.to(like.dtype)


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _dist_sum(value: int, device: torch.device | None = None) -> int:
    import torch.distributed as dist

    if _dist_world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_coll_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def _coll_device(device: torch.device | None) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# dependency levels


def _probe_levels(
    runner: nn.Module,
    sites: list[_Site],
    batch: Any,
    forward_fn: ForwardFn | None,
) -> list[int]:
    """Level of each site (1-based; 0 when the probe did not reach it), from one probe batch."""
    index = {id(s.module): i for i, s in enumerate(sites)}
    calls: list[list[Any]] = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        calls.append([index[id(mod)], args[0], None])

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        leaf = out.detach().requires_grad_(True)
        calls[-1][2] = leaf
        # a clone, so in-place ops after the BN (ReLU(inplace=True)) do not touch the leaf
        return leaf.clone()

    handles = []
    for s in sites:
        handles.append(s.module.register_forward_pre_hook(pre))
        handles.append(s.module.register_forward_hook(post))
    try:
        with torch.enable_grad():
            call_model(runner, batch, forward_fn)
            deps: list[set[int]] = [set() for _ in sites]
            for k, (j, x, _leaf) in enumerate(calls):
                earlier = [(i, leaf) for i, _x, leaf in calls[:k] if leaf is not None]
                if not earlier:
                    continue
                if not (isinstance(x, torch.Tensor) and x.requires_grad):
                    # the graph was cut (no_grad inside the model): assume every earlier BN
                    deps[j] |= {i for i, _ in earlier}
                    continue
                grads = torch.autograd.grad(
                    x,
                    [leaf for _, leaf in earlier],
                    grad_outputs=torch.ones_like(x),
                    retain_graph=True,
                    allow_unused=True,
                )
                deps[j] |= {i for (i, _), g in zip(earlier, grads, strict=True) if g is not None}
    finally:
        for h in handles:
            h.remove()
    reached = {j for j, _x, _l in calls}
    level = [1 if j in reached else 0 for j in range(len(sites))]
    for _ in range(len(sites) + 1):
        changed = False
        for j in reached:
            want = 1 + max((level[i] for i in deps[j] if i != j), default=0)
            if want > level[j]:
                level[j], changed = want, True
        if not changed:
            return level
    raise RecalibrationError("BatchNorm dependencies form a cycle")


def _call_order_levels(
    runner: nn.Module, sites: list[_Site], batch: Any, forward_fn: ForwardFn | None
) -> list[int]:
    """One level per site in first-call order (always correct, one pass per BN)."""
    index = {id(s.module): i for i, s in enumerate(sites)}
    order: list[int] = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        i = index[id(mod)]
        if i not in order:
            order.append(i)

    handles = [s.module.register_forward_pre_hook(pre) for s in sites]
    try:
        with torch.no_grad():
            call_model(runner, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    level = [0] * len(sites)
    for rank, i in enumerate(order):
        level[i] = rank + 1
    return level


def _levels(
    runner: nn.Module, sites: list[_Site], batch: Any, forward_fn: ForwardFn | None
) -> list[int]:
    if batch is None:
        level = [0] * len(sites)
    else:
        # two samples keep the autograd probe cheap; a model traced for a fixed batch size
        # refuses them, so the whole batch is the second try
        small = _truncate(batch, min(2, batch_size(batch)))
        try:
            level = _probe_levels(runner, sites, small, forward_fn)
        except Exception:
            try:
                level = _probe_levels(runner, sites, batch, forward_fn)
            except Exception:
                level = _call_order_levels(runner, sites, batch, forward_fn)
    if _dist_world() > 1:
        import torch.distributed as dist

        t = torch.tensor(level, dtype=torch.int64, device=_coll_device(None))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        level = [int(v) for v in t.tolist()]
    # BNs the probe did not reach are measured last, after everything they might depend on
    last = max(level, default=0) + 1
    return [lv if lv > 0 else last for lv in level]


# ---------------------------------------------------------------------------------------------
# the passes


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


class _StopPass(BaseException):
    """Raised by the last measured BN call of a forward: the rest of the network is not needed.

    A ``BaseException``, so a model that catches ``Exception`` inside its forward cannot
    swallow it.
    """


@dataclass(eq=False)
class _PassState:
    """What the measuring forwards of one pass share."""

    scratch: Scratch
    check_finite: bool = True
    calls: int = 0
    stop_at: int = 0
    #: this batch's moments per call, in call order, for the NaN/Inf check after the batch
    seen: list[tuple[_Site, Vector, Vector]] = field(default_factory=list)


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _batch_stats_like(
    n: int, mean: Vector, m2: Vector, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance in ``x``'s dtype and device, for normalising ``x``.

    Host moments are converted with numpy: on ``(C,)`` vectors its per-call cost is a fraction
    of torch's, and this runs once per BN call.
    """
    if isinstance(mean, np.ndarray) and isinstance(m2, np.ndarray):
        kind = np.float32 if x.dtype == torch.float32 else np.float64
        var = m2 / max(n, 1)
        return torch.from_numpy(mean.astype(kind)), torch.from_numpy(var.astype(kind))
    mean_t, m2_t = torch.as_tensor(mean), torch.as_tensor(m2)
    return mean_t.to(x.device, x.dtype), (m2_t / max(n, 1)).to(x.device, x.dtype)


def _measuring_forward(site: _Site, state: _PassState, batch_stats: bool) -> Any:
    """A replacement ``forward`` for ``site.module`` that measures its input, then normalises.

    The input is reduced once, to float64 ``(n, mean, M2)``, which feed the accumulator. In
    batch mode the same moments then normalise the input (an inference-mode ``batch_norm``
    with the batch's mean and biased variance, which is what a training-mode BN computes), so
    the input is not reduced a second time by the BN itself. Modules of other types
    (``SyncBatchNorm``, subclasses with their own forward) keep their own forward, switched to
    batch statistics by :meth:`_Site.set_batch_stats`.
    """
    module = site.module
    acc = site.acc
    original = module.forward
    own_norm = batch_stats and site.normalises_itself
    eps = float(module.eps)

    def forward(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        n, mean, m2 = moments(x, 1, state.scratch)
        acc.add_batch(n, mean, m2)
        if state.check_finite:
            state.seen.append((site, mean, m2))
        site.samples += int(x.shape[0]) if x.dim() else 1
        state.calls += 1
        if state.calls == state.stop_at:
            raise _StopPass
        if not own_norm:
            return original(x, *rest)
        weight: torch.Tensor | None
        bias: torch.Tensor | None
        if isinstance(module, _FunctionalBatchNorm):
            weight, bias = rest[0], rest[1]
        else:
            weight, bias = module.weight, module.bias
        if _half(x.dtype):
            # half-precision BNs normalise in float32, as training-mode batch_norm does
            y = F.batch_norm(
                x.float(),
                torch.as_tensor(mean).float(),
                (torch.as_tensor(m2) / max(n, 1)).float(),
                None if weight is None else weight.float(),
                None if bias is None else bias.float(),
                False,
                0.0,
                eps,
            )
            return y.to(x.dtype)
        mean_x, var_x = _batch_stats_like(n, mean, m2, x)
        return F.batch_norm(x, mean_x, var_x, weight, bias, False, 0.0, eps)

    return forward


def _check_finite(seen: list[tuple[_Site, Vector, Vector]], batch: int) -> None:
    """Stop naming the first BN (in call order) whose batch moments are NaN/Inf.

    NaN or Inf anywhere in a BN's input makes its mean or M2 non-finite, so checking the
    ``(C,)`` moments of the batch is enough. All of a batch's moments are checked at once (one
    synchronisation per batch on an accelerator); only a failure looks at them one by one.
    """
    if not seen:
        return
    host = [t for _, m, q in seen for t in (m, q) if isinstance(t, np.ndarray)]
    device = [t for _, m, q in seen for t in (m, q) if isinstance(t, torch.Tensor)]
    if (not host or bool(np.isfinite(np.concatenate(host)).all())) and (
        not device
        or bool(torch.isfinite(torch.cat([t.flatten().to(device[0].device) for t in device])).all())
    ):
        return
    for site, mean, m2 in seen:
        if not (_finite(mean) and _finite(m2)):
            raise RecalibrationError(
                f"BatchNorm {site.name!r} received NaN or Inf activations in batch {batch}; "
                "check the data and the layers before it"
            )


def _finite(v: Vector) -> bool:
    if isinstance(v, np.ndarray):
        return bool(np.isfinite(v).all())
    return bool(torch.isfinite(v).all())


def _run_pass(
    runner: nn.Module,
    sites: list[_Site],
    data: Iterable[Any],
    *,
    options: Options,
    device: torch.device | None,
    scratch: Scratch,
    progress: Any,
    description: str,
) -> tuple[int, int]:
    """One pass over the data with the active sites measured; returns (batches, samples).

    The first batch runs the whole forward and counts the calls of active BNs; every later
    batch stops (:class:`_StopPass`) right after that many calls, so a pass costs only the
    prefix of the network up to its deepest measured BN. This assumes the BN calls of a
    forward do not depend on the data, as in every static-shape network.
    """
    active = [s for s in sites if s.active]
    state = _PassState(scratch, check_finite=options.check_finite)
    batch_stats = options.mode == "batch"
    patched: list[tuple[nn.Module, Any]] = []
    for s in active:
        # keep a forward the caller set on the instance, to put it back afterwards
        patched.append((s.module, s.module.__dict__.get("forward")))
        # an instance attribute shadows the class's forward; nn.Module declares forward as
        # a callable attribute, which is what is assigned here
        target: nn.Module = s.module
        target.forward = _measuring_forward(s, state, batch_stats)
    batches = samples = 0
    task = progress.add_task(description, total=options.num_batches)
    try:
        with torch.no_grad():
            for i, batch in enumerate(
                iter_budget(data, num_samples=options.num_samples, num_batches=options.num_batches)
            ):
                batch = to_device(batch, device)
                state.calls = 0
                with contextlib.suppress(_StopPass):
                    call_model(runner, batch, options.forward_fn)
                if i == 0:
                    state.stop_at = state.calls
                batches += 1
                samples += batch_size(batch)
                _check_finite(state.seen, i + 1)
                state.seen.clear()
                progress.advance(task)
    finally:
        for module, previous in patched:
            del module.forward
            if previous is not None:
                module.forward = previous
        progress.remove_task(task)
    return batches, samples


def _write(site: _Site) -> None:
    mean, var = site.acc.result()
    with torch.no_grad():
        site.running_mean.copy_(_round_like(mean, site.running_mean))
        site.running_var.copy_(_round_like(var, site.running_var))
        if site.num_batches_tracked is not None:
            site.num_batches_tracked.fill_(site.acc.batches)


def _report_entry(site: _Site) -> BNStats:
    entry = BNStats(name=site.name, status="unreached", channels=site.channels, level=site.level)
    old_mean, old_var = site.old_mean.double(), site.old_var.double()
    entry.old_mean_abs = float(old_mean.abs().mean()) if old_mean.numel() else 0.0
    entry.old_var_mean = float(old_var.mean()) if old_var.numel() else 0.0
    if site.acc.count == 0:
        entry.new_mean_abs, entry.new_var_mean = entry.old_mean_abs, entry.old_var_mean
        return entry
    new_mean = site.running_mean.detach().double().cpu()
    new_var = site.running_var.detach().double().cpu()
    entry.status = "updated"
    entry.samples = site.samples
    entry.elements = site.acc.count
    entry.batches = site.acc.batches
    entry.new_mean_abs = float(new_mean.abs().mean())
    entry.new_var_mean = float(new_var.mean())
    denom = old_var.clamp_min(torch.finfo(torch.float64).tiny)
    entry.max_rel_var_change = float(((new_var - old_var).abs() / denom).max())
    _mean, var64 = site.acc.result()
    entry.zero_variance_channels = [int(c) for c in torch.nonzero(var64.cpu() == 0).flatten()]
    return entry


def recalibrate_torch(
    model: Any, data: Iterable[Any], options: Options | None = None
) -> RecalibrationReport:
    """Recalibrate a torch model; see :func:`bnfold.recalibrate` for the options."""
    options = options or Options()
    mode = options.mode
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    elif not isinstance(model, nn.Module):
        raise BadInputError(
            f"cannot recalibrate a {type(model).__name__}; pass an nn.Module, a GraphModule, an "
            "ExportedProgram or an ONNX model"
        )
    elif not options.inplace:
        model = copy.deepcopy(model)
    runner, sites, stateless = _sites(model, options.estimator)
    if not sites:
        raise BadInputError(
            "the model has no BatchNorm with running statistics; nothing to recalibrate"
        )
    if mode == "population":
        data = options.replayable(data)
    dev = torch.device(options.device) if options.device is not None else _model_device(model)
    for s in sites:
        s.old_mean = s.running_mean.detach().clone().cpu()
        s.old_var = s.running_var.detach().clone().cpu()
        s.old_nbt = None if s.num_batches_tracked is None else s.num_batches_tracked.clone()
    flags = {m: m.training for m in model.modules()}
    tracking = {
        s.module: s.module.track_running_stats
        for s in sites
        if hasattr(s.module, "track_running_stats")
    }
    report = RecalibrationReport(
        model=model,
        framework="torch",
        mode=mode,
        estimator=options.estimator,
        world_size=_dist_world(),
    )
    try:
        # flags set directly: ExportedProgram.module() refuses eval()
        for m in flags:
            m.training = False
        if runner is not model:
            for m in runner.modules():
                m.training = False
        with _progress(options.progress) as bar:
            scratch = Scratch()
            if mode == "batch":
                for s in sites:
                    if not s.normalises_itself:
                        s.set_batch_stats(True)
                    s.active = True
                groups = [sites]
            else:
                budget = iter_budget(data, num_samples=options.num_samples, num_batches=1)
                first = next(iter(budget), None)
                levels = _levels(runner, sites, to_device(first, dev), options.forward_fn)
                for s, lv in zip(sites, levels, strict=True):
                    s.level = lv
                groups = [[s for s in sites if s.level == lv] for lv in sorted(set(levels))]
            for k, group in enumerate(groups):
                for s in sites:
                    s.active = s in group
                batches, samples = _run_pass(
                    runner,
                    sites,
                    data,
                    options=options,
                    device=dev,
                    scratch=scratch,
                    progress=bar,
                    description=f"recalibrating (pass {k + 1}/{len(groups)})",
                )
                if k == 0:
                    report.batches, report.samples = batches, samples
                    if _dist_sum(batches, dev or torch.device("cpu")) == 0:
                        raise RecalibrationError(
                            "the data yielded no batch; pass a non-empty loader (or a larger "
                            "num_samples/num_batches budget)"
                        )
                all_reduce_stats([s.acc for s in group])
                if mode == "population":
                    for s in group:
                        if s.acc.count:
                            _write(s)
            report.passes = len(groups)
            if mode == "batch":
                for s in sites:
                    s.set_batch_stats(False)
                    if s.acc.count:
                        _write(s)
    except BaseException:
        with torch.no_grad():
            for s in sites:
                s.running_mean.copy_(s.old_mean.to(s.running_mean.device))
                s.running_var.copy_(s.old_var.to(s.running_var.device))
                if s.num_batches_tracked is not None and s.old_nbt is not None:
                    s.num_batches_tracked.copy_(s.old_nbt)
        raise
    finally:
        for m, t in tracking.items():
            m.track_running_stats = t
        for m, training in flags.items():
            m.training = training
        for s in sites:
            if isinstance(s.module, _FunctionalBatchNorm):
                s.module.use_batch_stats = False
    for s in sites:
        if mode == "batch":
            s.level = 1
        report.bns.append(_report_entry(s))
    for name in stateless:
        report.bns.append(BNStats(name=name, status="no-running-stats", channels=0))
    return report
