"""Depth levels of the BatchNorms: which BNs population mode may measure in the same pass.

Level 1 holds the BNs with no BN upstream, level ``k`` the BNs whose deepest upstream BN is on
level ``k - 1``. The levels come from one probe forward on two samples of the first batch with
autograd: each BN output is replaced by a fresh leaf tensor, and a BN depends on every BN whose
leaf reaches its input. If the probe cannot run (or the dependencies form a cycle through a
reused module), BNs get one level each in call order, which is always correct.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnfold.errors import RecalibrationError
from bnfold.recalib.data import ForwardFn, _truncate, batch_size, call_model
from bnfold.recalib.dist import dist_max
from bnfold.recalib.torch_sites import Site

__all__ = ["measure_levels"]


def _probe_levels(
    runner: nn.Module,
    sites: list[Site],
    batch: Any,
    forward_fn: ForwardFn | None,
) -> tuple[list[int], list[int]]:
    """Level of each site (1-based; 0 when the probe did not reach it), from one probe batch,
    and the site of every BN call of the probe forward, in call order."""
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
    finally:
        for h in handles:
            h.remove()
    deps = _dependencies(calls, len(sites))
    reached = {j for j, _x, _l in calls}
    level = [1 if j in reached else 0 for j in range(len(sites))]
    for _ in range(len(sites) + 1):
        changed = False
        for j in reached:
            want = 1 + max((level[i] for i in deps[j] if i != j), default=0)
            if want > level[j]:
                level[j], changed = want, True
        if not changed:
            return level, [j for j, _x, _l in calls]
    raise RecalibrationError("BatchNorm dependencies form a cycle")


def _dependencies(calls: list[list[Any]], count: int) -> list[set[int]]:
    """For each site, the sites whose BN output (a leaf of the probe) reaches one of its inputs.

    A leaf reaches a tensor when the tensor's autograd graph leads back to it, which is when
    ``torch.autograd.grad`` of the tensor would give the leaf a gradient. The graph is walked
    once, each node's set of reached leaves (a bitmask of sites) kept for the nodes that lead
    to it: about one backward's worth of Python for the whole probe, where a gradient per BN
    call cost a backward through the prefix per call (6% of a 512-sample recalibration of
    densenet121, quadratic in depth).
    """
    leaf_site = {id(leaf): j for j, _x, leaf in calls if leaf is not None}
    memo: dict[Any, int] = {}

    def reached(fn: Any) -> int:
        # iterative post-order walk: a deep network's graph is deeper than Python's stack
        stack: list[tuple[Any, list[Any] | None]] = [(fn, None)]
        while stack:
            node, parents = stack.pop()
            if node in memo:
                continue
            if parents is None:  # first visit: its parents go first
                parents = [f for f, _ in node.next_functions if f is not None]
                stack.append((node, parents))
                stack.extend((f, None) for f in parents if f not in memo)
                continue
            mask = 0
            leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
            if leaf is not None and id(leaf) in leaf_site:
                mask = 1 << leaf_site[id(leaf)]
            for f in parents:
                mask |= memo[f]
            memo[node] = mask
        return memo[fn]

    deps: list[set[int]] = [set() for _ in range(count)]
    earlier: set[int] = set()  # sites whose output an earlier call made
    for j, x, leaf in calls:
        if earlier and not (isinstance(x, torch.Tensor) and x.requires_grad):
            # the graph was cut (no_grad inside the model): assume every earlier BN
            deps[j] |= earlier
        elif earlier:
            if x.grad_fn is None:
                mask = 1 << leaf_site[id(x)] if id(x) in leaf_site else 0
            else:
                mask = reached(x.grad_fn)
            deps[j] |= {i for i in earlier if mask >> i & 1}
        if leaf is not None:
            earlier.add(j)
    return deps


def _call_order_levels(
    runner: nn.Module, sites: list[Site], batch: Any, forward_fn: ForwardFn | None
) -> tuple[list[int], list[int]]:
    """One level per site in first-call order (always correct, one pass per BN), and the site
    of every BN call in call order."""
    index = {id(s.module): i for i, s in enumerate(sites)}
    order: list[int] = []
    calls: list[int] = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        i = index[id(mod)]
        calls.append(i)
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
    return level, calls


def measure_levels(
    runner: nn.Module, sites: list[Site], batch: Any, forward_fn: ForwardFn | None
) -> tuple[list[int], list[int] | None]:
    """The depth level of every site (1 = no BN upstream), and the BN call sequence.

    The levels are agreed across ranks (elementwise maximum), so every rank makes the same
    passes. The call sequence (site index per call, from this rank's probe; None without a
    batch) lets a graph plan check that the graph calls the BNs the eager model calls.
    """
    calls: list[int] | None = None
    if batch is None:
        level = [0] * len(sites)
    else:
        # two samples keep the autograd probe cheap; a model traced for a fixed batch size
        # refuses them, so the whole batch is the second try
        small = _truncate(batch, min(2, batch_size(batch)))
        try:
            level, calls = _probe_levels(runner, sites, small, forward_fn)
        except Exception:
            try:
                level, calls = _probe_levels(runner, sites, batch, forward_fn)
            except Exception:
                level, calls = _call_order_levels(runner, sites, batch, forward_fn)
    level = dist_max(level)
    # BNs the probe did not reach are measured last, after everything they might depend on
    last = max(level, default=0) + 1
    return [lv if lv > 0 else last for lv in level], calls
