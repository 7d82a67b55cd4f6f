"""Run population mode over a :class:`~bnfold.recalib.frontier_plan.FrontierPlan`.

Pass ``k`` takes each batch from its stored checkpoint (the frontier of the last pass that
could store one; the raw batch before the first pass), runs the graph nodes from there to
segment ``k``, measures the level-``k`` BN inputs with the same reduction as the module hooks
(:func:`bnfold.recalib.passes.measure`), and stores the new frontier in the
:class:`~bnfold.recalib.frontier_store.FrontierStore`. A batch whose frontier found no room
keeps its older checkpoint and the next pass recomputes from it; a batch without any
checkpoint is read from the data again (which then must be re-iterable). Nodes run in graph
order with the tensors a forward would give them, so the statistics are the bits of one full
forward per level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import BadInputError, RecalibrationError
from bnfold.recalib.data import batch_size, call_model, iter_budget, to_device
from bnfold.recalib.frontier_plan import FrontierPlan
from bnfold.recalib.frontier_store import FrontierStore
from bnfold.recalib.options import Options
from bnfold.recalib.passes import PassState, check_finite, measure
from bnfold.recalib.stats import Scratch
from bnfold.recalib.torch_sites import Site

__all__ = ["FrontierRun", "model_inputs", "run_pre_hooks"]


class _Recorded(BaseException):
    """Carries the arguments a model was called with out of ``call_model``/``forward_fn``."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.call = (args, kwargs)


class _Recorder:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Recorded(args, kwargs)


def model_inputs(batch: Any, forward_fn: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` the model is called with on ``batch``."""
    try:
        call_model(_Recorder(), batch, forward_fn)
    except _Recorded as r:
        return r.call
    raise RecalibrationError("forward_fn returned without calling the model")


def run_pre_hooks(
    root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call ``root``'s forward pre-hooks as ``root(*args, **kwargs)`` would.

    The graph runs node by node, not through ``root.__call__``, but the hooks are part of
    calling the model: ``ExportedProgram.module()`` checks its input shapes in one (a program
    exported for a fixed batch size refuses another), and a user's hook may edit the inputs.
    """
    with_kwargs = root._forward_pre_hooks_with_kwargs
    for key, hook in list(root._forward_pre_hooks.items()):
        try:
            result = hook(root, args, kwargs) if key in with_kwargs else hook(root, args)
        except Exception as e:
            lines = str(e).strip().splitlines()
            raise BadInputError(
                f"the model refuses the batch: {lines[0] if lines else type(e).__name__}"
            ) from None
        if result is None:
            continue
        if key in with_kwargs:
            args, kwargs = result
        else:
            args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


@dataclass
class _Counts:
    batches: int = 0
    samples: int = 0
    recomputed: int = 0


class FrontierRun:
    """The passes of one population-mode recalibration over a captured graph."""

    def __init__(
        self,
        plan: FrontierPlan,
        sites: list[Site],
        data: Iterable[Any],
        store: FrontierStore,
        *,
        options: Options,
        device: torch.device | None,
    ) -> None:
        self.plan = plan
        self.sites = sites
        self.data = data
        self.store = store
        self.options = options
        self.device = device
        self.counts = _Counts()
        self._batches: int | None = None

    def _env(self, batch: Any) -> dict[fx.Node, Any]:
        args, kwargs = model_inputs(batch, self.options.forward_fn)
        args, kwargs = run_pre_hooks(self.plan.caller, args, kwargs)
        try:
            values = self.plan.bind(args, kwargs)
        except TypeError as e:
            raise BadInputError(f"a batch does not fit the model's inputs: {e}") from None
        return dict(zip(self.plan.placeholders, values, strict=True))

    def _execute(self, env: dict[fx.Node, Any], start: int, stop: int) -> None:
        plan = self.plan
        nodes, frees = plan.run(start, stop)

        def value(a: fx.Node) -> Any:
            return plan.consts[a] if a in plan.consts else env[a]

        for node, free in zip(nodes, frees, strict=True):
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if not node.users:
                # a check with no result (an exported program's input guard)
                try:
                    self._call(node, args, kwargs)
                except Exception as e:
                    lines = str(e).strip().splitlines()
                    raise BadInputError(
                        f"the model refuses the batch: {lines[0] if lines else type(e).__name__}"
                    ) from None
            else:
                env[node] = self._call(node, args, kwargs)
            for a in free:
                env.pop(a, None)

    def _call(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if node.op == "call_module":
            return self.plan.modules[node](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        obj, *rest = args  # call_method
        return getattr(obj, str(node.target))(*rest, **kwargs)

    def _fresh_source(self) -> Iterator[Any]:
        if isinstance(self.data, Iterator):
            raise BadInputError(
                "the data's frontier did not fit data_cache_mb and its spill limit, and the "
                "data is a one-shot iterator, but mode='population' must then read it again; "
                "raise data_cache_mb, pass a re-iterable loader, or use mode='batch'"
            )
        return iter_budget(
            self.data, num_samples=self.options.num_samples, num_batches=self.options.num_batches
        )

    def run_pass(
        self, k: int, first_pass: Iterator[Any] | None, scratch: Scratch, progress: Any
    ) -> None:
        """Pass ``k`` (1-based): measure the level-``k`` BNs on every batch.

        ``first_pass`` yields the batches for pass 1 (the probe's batch first); later passes
        read the store, and the data again only for batches it holds nothing for.
        """
        plan = self.plan
        measured = plan.measured.get(k, [])
        state = PassState(scratch, check_finite=self.options.check_finite)
        keep_after = plan.live_after(k) if k < plan.passes else []
        raw: Iterator[Any] | None = None
        raw_at = 0
        task = progress.add_task(f"recalibrating (pass {k}/{plan.passes})", total=self._batches)
        try:
            with torch.no_grad():
                b = 0
                while True:
                    if k == 1:
                        assert first_pass is not None
                        batch = next(first_pass, None)
                        if batch is None:
                            break
                        batch = to_device(batch, self.device)
                        self.counts.batches += 1
                        self.counts.samples += batch_size(batch)
                        env, start = self._env(batch), 0
                        raw_values = {n.name: env[n] for n in plan.live_after(0)}
                    else:
                        if b >= (self._batches or 0):
                            break
                        stored = self.store.get(b)
                        if stored is None:
                            if raw is None:
                                raw = self._fresh_source()
                            batch = None
                            while raw_at <= b:
                                batch = next(raw, None)
                                raw_at += 1
                            if batch is None:
                                raise RecalibrationError(
                                    "the data yielded fewer batches when read again; pass a "
                                    "loader that yields the same batches every time"
                                )
                            env, start = self._env(to_device(batch, self.device)), 0
                        else:
                            start, values = stored
                            env = {n: values[n.name] for n in plan.live_after(start)}
                        self.counts.recomputed += max(k - 1 - start, 0)
                    self._execute(env, start, k)
                    for node, i in measured:
                        x = env[node.args[0]]  # type: ignore[index]
                        measure(self.sites[i], x, state)
                    check_finite(state.seen, b + 1)
                    state.seen.clear()
                    if keep_after:
                        frontier = {n.name: env[n] for n in keep_after}
                        if not self.store.put(b, k, frontier) and k == 1:
                            # no room for the frontier: the raw batch is the nearest checkpoint
                            self.store.put(b, 0, raw_values)
                    b += 1
                    progress.advance(task)
        finally:
            progress.remove_task(task)
        if k == 1:
            self._batches = self.counts.batches
