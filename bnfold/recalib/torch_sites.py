"""Find the BatchNorms of a PyTorch model that recalibration observes, and write their results.

A site is one BatchNorm with running statistics: a BN module of the model (a module called at
several sites is one site, so all its calls pool into one accumulator), or a functional
``batch_norm`` node of a GraphModule, which is rewritten into a call of a small stand-in module
(:class:`FunctionalBatchNorm`) so that the same hooks and graph passes observe both spellings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.recalib.report import BNStats
from bnfold.recalib.stats import ChannelStats, make_accumulator

__all__ = [
    "BNModule",
    "FunctionalBatchNorm",
    "Site",
    "discover_sites",
    "model_device",
    "report_entry",
    "restore",
    "snapshot",
    "write_stats",
]

_FUNCTIONAL_BN = (torch.ops.aten.batch_norm.default, F.batch_norm)
# BN types whose forward is exactly F.batch_norm: their batch-mode normalisation can reuse
# bnfold's moments
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FunctionalBatchNorm(nn.Module):
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
BNModule = nn.modules.batchnorm._BatchNorm | FunctionalBatchNorm


@dataclass(eq=False)
class Site:
    """One BatchNorm to recalibrate: the module observed and the buffers written."""

    name: str
    module: BNModule
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
        return isinstance(self.module, FunctionalBatchNorm) or type(self.module) in _PLAIN_BN

    def set_batch_stats(self, on: bool) -> None:
        m = self.module
        if isinstance(m, FunctionalBatchNorm):
            m.use_batch_stats = on
        else:
            # training=True with track_running_stats=False: batch statistics, no buffer update
            m.training = on
            m.track_running_stats = not on


def bn_modules(
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


def rewrite_functional(
    gm: torch.fx.GraphModule,
) -> tuple[torch.fx.GraphModule, list[tuple[str, FunctionalBatchNorm, torch.Tensor, torch.Tensor]]]:
    """A GraphModule sharing ``gm``'s tensors with functional BN nodes as observable modules."""
    graph = copy.deepcopy(gm.graph)
    found: list[tuple[str, FunctionalBatchNorm, torch.Tensor, torch.Tensor, str]] = []
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
        sub = FunctionalBatchNorm(float(eps))
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


def discover_sites(model: nn.Module, estimator: str) -> tuple[nn.Module, list[Site], list[str]]:
    """The module to run, the sites, and the names of BNs without running statistics.

    For a GraphModule with functional BN nodes the module to run is a rewritten copy sharing
    the model's tensors; otherwise it is the model itself.
    """
    runner = model
    functional: list[tuple[str, FunctionalBatchNorm, torch.Tensor, torch.Tensor]] = []
    if isinstance(model, torch.fx.GraphModule):
        runner, functional = rewrite_functional(model)
    mods, stateless = bn_modules(model)
    sites = []
    for name, m, rm, rv in mods:
        acc = make_accumulator(estimator, rm.numel(), rm.device)
        sites.append(Site(name, m, rm, rv, m.num_batches_tracked, acc))
    for name, sub, rm, rv in functional:
        nbt_name = f"{name}.num_batches_tracked"
        try:
            nbt = _attr(model, nbt_name)
        except AttributeError:
            nbt = None
        if not isinstance(nbt, torch.Tensor):
            nbt = None
        acc = make_accumulator(estimator, rm.numel(), rm.device)
        sites.append(Site(name, sub, rm, rv, nbt, acc))
    return runner, sites, stateless


def model_device(model: nn.Module) -> torch.device | None:
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


def write_stats(site: Site) -> None:
    mean, var = site.acc.result()
    with torch.no_grad():
        site.running_mean.copy_(_round_like(mean, site.running_mean))
        site.running_var.copy_(_round_like(var, site.running_var))
        if site.num_batches_tracked is not None:
            site.num_batches_tracked.fill_(site.acc.batches)


def report_entry(site: Site) -> BNStats:
    """The site's line of the report, computed in float64 with numpy on host copies (a
    handful of ``(C,)`` vectors per BN, where a torch op per figure cost 70 us a BN)."""
    entry = BNStats(name=site.name, status="unreached", channels=site.channels, level=site.level)
    old_mean = site.old_mean.double().numpy()
    old_var = site.old_var.double().numpy()
    entry.old_mean_abs = float(np.abs(old_mean).mean()) if old_mean.size else 0.0
    entry.old_var_mean = float(old_var.mean()) if old_var.size else 0.0
    if site.acc.count == 0:
        entry.new_mean_abs, entry.new_var_mean = entry.old_mean_abs, entry.old_var_mean
        return entry
    new_mean = site.running_mean.detach().cpu().double().numpy()
    new_var = site.running_var.detach().cpu().double().numpy()
    entry.status = "updated"
    entry.samples = site.samples
    entry.elements = site.acc.count
    entry.batches = site.acc.batches
    entry.new_mean_abs = float(np.abs(new_mean).mean())
    entry.new_var_mean = float(new_var.mean())
    denom = np.maximum(old_var, np.finfo(np.float64).tiny)
    entry.max_rel_var_change = float((np.abs(new_var - old_var) / denom).max())
    _mean, var64 = site.acc.result()
    entry.zero_variance_channels = np.flatnonzero(var64.cpu().numpy() == 0).tolist()
    return entry


def snapshot(sites: list[Site]) -> None:
    """Save every site's buffers, so that :func:`restore` can undo a failed run."""
    for s in sites:
        s.old_mean = s.running_mean.detach().clone().cpu()
        s.old_var = s.running_var.detach().clone().cpu()
        s.old_nbt = None if s.num_batches_tracked is None else s.num_batches_tracked.clone()


def restore(sites: list[Site]) -> None:
    """Put back the buffers saved by :func:`snapshot`."""
    with torch.no_grad():
        for s in sites:
            s.running_mean.copy_(s.old_mean.to(s.running_mean.device))
            s.running_var.copy_(s.old_var.to(s.running_var.device))
            if s.num_batches_tracked is not None and s.old_nbt is not None:
                s.num_batches_tracked.copy_(s.old_nbt)
