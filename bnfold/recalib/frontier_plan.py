"""Plan population mode as one forward cut into segments at the BatchNorm depth levels.

Pass ``k`` measures the inputs of the level-``k`` BNs, and needs the BNs of lower levels to
normalise with their *new* statistics, known only once pass ``k - 1`` has seen every batch.
On the captured graph (torch.fx; a GraphModule as given), every node gets the first pass
that can compute it, its *segment*: a BN call of level ``L`` is in segment ``L + 1`` (its
output needs its own new statistics), any other node in the latest segment of its inputs
(at least 1). Pass ``k`` runs the nodes of segment ``k`` and keeps, per batch, the values
of segments ``<= k`` that later segments read (the *frontier*, skip connections included),
so each layer runs once per sample over the whole recalibration instead of once per level.

The plan is used only when it reproduces the eager passes exactly; otherwise the reason is
returned and the driver falls back to one full pass per level:

- the model traces (BN modules are leaves) and the graph calls the BN sites in the order the
  eager probe forward called them;
- every BN's input is ready by its own pass (a BN module reused in a chain at one level,
  e.g. in a loop, reads its own old-statistics output during that pass: not a segment cut);
- every in-place op works on a fresh value computed in its own segment and read by nobody in
  another segment, under any of its names (an ``nn.Identity`` or eval-mode dropout passes the
  tensor itself on, as timm's ``drop_block`` before an in-place activation does), so running
  segments one after the other changes nothing (stored frontier values are never written
  to). A model that edits its input in place falls back.
- the batch binds to the graph's inputs (plain positional/keyword parameters).
"""

from __future__ import annotations

import inspect
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnfold.passthrough import returns_its_input
from bnfold.recalib.torch_sites import Site

__all__ = ["FrontierPlan", "plan_frontier"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """The modules and functions timm marks as not traceable, where timm is already imported.

    timm registers the layers whose forward computes on input sizes (``Conv2dSame`` and the
    other "same"-padding layers of its ``tf_*`` models, window attention, ...) for its own
    torch.fx feature extraction, which keeps them as leaf modules and wraps the functions.
    The same registry lets these models trace here. timm is never imported by bnfold: a model
    built with timm has imported it already.
    """
    layers = sys.modules.get("timm.layers")
    try:
        modules = tuple(getattr(layers, "get_notrace_modules")())  # noqa: B009
        functions = tuple(getattr(layers, "get_notrace_functions")())  # noqa: B009
    except Exception:  # no timm, or one without the registry
        return (), ()
    return modules, functions


class _Tracer(fx.Tracer):
    """Keeps BN modules (any subclass, the user's own too) as leaves, so each call is a node,
    and honours timm's not-traceable registry (:func:`_timm_notrace`). A leaf that holds a
    BN hides its calls from the graph, which the plan then refuses (the graph would not call
    the BNs the model calls), so a leaf never changes the result, only the reach."""

    def __init__(self) -> None:
        modules, functions = _timm_notrace()
        self._leaves = (_BatchNorm, torch.jit.ScriptModule, *modules)
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}

#: functions and methods whose result is a new tensor (never a view of an argument)
_FRESH_CALLS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.matmul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.cat,
    torch.stack,
    torch.matmul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.nn.functional.hardswish,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv3d,
    torch.nn.functional.linear,
    torch.nn.functional.batch_norm,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "matmul", "clone"}
_FRESH_MODULES = (_BatchNorm, _ConvNd, nn.Linear)


@dataclass
class FrontierPlan:
    """The captured graph cut into segments, and what each pass runs, measures and keeps."""

    #: the module the user called: its forward pre-hooks run before every batch
    caller: nn.Module
    placeholders: list[fx.Node]
    bind: Callable[[tuple[Any, ...], dict[str, Any]], list[Any]]
    segment: dict[fx.Node, int]
    consts: dict[fx.Node, Any]
    modules: dict[fx.Node, nn.Module]
    #: per pass (1-based), the BN calls it measures in graph order: (node, site index)
    measured: dict[int, list[tuple[fx.Node, int]]]
    order: list[fx.Node]
    passes: int
    #: the nodes whose inputs a later pass reads: those a BN input depends on, the graph
    #: inputs, and the measured BN calls themselves
    readers: set[fx.Node]
    _runs: dict[tuple[int, int], tuple[list[fx.Node], list[list[fx.Node]]]] = field(
        default_factory=dict
    )
    _live: dict[int, list[fx.Node]] = field(default_factory=dict)

    def live_after(self, k: int) -> list[fx.Node]:
        """Values of segments ``<= k`` that nodes of later segments read: the frontier."""
        if not self._live:
            self._live = self._frontiers()
        return self._live.get(k, [])

    def _frontiers(self) -> dict[int, list[fx.Node]]:
        """:meth:`live_after` for every ``k`` at once, in graph order.

        A value is live from its own segment up to (not including) the last segment that
        reads it, so one sweep over the nodes and their readers fills every frontier: a scan
        of the whole graph per pass made this quadratic (about 30 ms per run on densenet121's
        121 passes).
        """
        live: dict[int, list[fx.Node]] = {k: [] for k in range(self.passes + 1)}
        for u in self.placeholders + self.order:
            last = max((self.segment.get(v, -1) for v in u.users if v in self.readers), default=-1)
            for k in range(self.segment[u], last):
                live[k].append(u)
        return live

    def run(self, start: int, stop: int) -> tuple[list[fx.Node], list[list[fx.Node]]]:
        """The nodes of segments ``start+1 .. stop`` in graph order, and after each node the
        values no longer read by this run (freed unless they are kept for later passes)."""
        key = (start, stop)
        if key not in self._runs:
            nodes = [n for n in self.order if start < self.segment[n] <= stop]
            keep = set(self.live_after(stop)) | {n.args[0] for n, _ in self.measured.get(stop, [])}
            last: dict[fx.Node, int] = {}
            for i, n in enumerate(nodes):
                for a in n.all_input_nodes:
                    last[a] = i
            frees: list[list[fx.Node]] = [[] for _ in nodes]
            for a, i in last.items():
                if a not in keep and a not in self.consts:
                    frees[i].append(a)
            self._runs[key] = (nodes, frees)
        return self._runs[key]


def _mutated_arg(node: fx.Node, modules: dict[fx.Node, nn.Module]) -> fx.Node | bool | None:
    """The node whose value ``node`` writes in place; None if it writes nothing; True if it
    writes something that cannot be named (treated as unsafe)."""
    target = node.target
    first = node.args[0] if node.args else None
    written = first if isinstance(first, fx.Node) else True
    if node.op == "call_module":
        return written if getattr(modules[node], "inplace", False) is True else None
    if node.op == "call_method":
        name = str(target)
        if (name.endswith("_") and not name.startswith("__")) or name == "__setitem__":
            return written
        return None
    if node.op != "call_function":
        return None
    if target in _INPLACE_OPERATORS:
        return written
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return written if schema.is_mutable else None
    if node.kwargs.get("inplace") is True:
        return written
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        return written
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return written if bound.arguments.get("inplace") is True else None


def _fresh(node: fx.Node, modules: dict[fx.Node, nn.Module]) -> bool:
    """Whether ``node``'s value is a new tensor, not a view of another node's value."""
    if node.op == "call_module":
        return isinstance(modules[node], _FRESH_MODULES) or type(modules[node]).__name__ in (
            "FunctionalBatchNorm",
        )
    if node.op == "call_method":
        return str(node.target) in _FRESH_METHODS
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return not schema.is_mutable and not any(r.alias_info for r in schema.returns)
        return node.target in _FRESH_CALLS
    return False


def _passes_through(node: fx.Node, modules: dict[fx.Node, nn.Module]) -> bool:
    """Whether ``node`` returns its one input tensor itself (recalibration runs every module
    in eval mode; timm's ``drop_block``/``attn`` placeholders are ``nn.Identity``)."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    return returns_its_input(modules[node])


def _alias_root(node: fx.Node, modules: dict[fx.Node, nn.Module]) -> fx.Node:
    """The node whose value ``node``'s value is, seen through pass-through modules."""
    while _passes_through(node, modules) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _aliases(base: fx.Node, modules: dict[fx.Node, nn.Module]) -> list[fx.Node]:
    """``base`` and every node that passes its value through unchanged (all names of one
    tensor, which an in-place op on any of them writes)."""
    found, stack = [base], [base]
    while stack:
        for user in stack.pop().users:
            if user not in found and _passes_through(user, modules):
                found.append(user)
                stack.append(user)
    return found


def _impure(node: fx.Node) -> bool:
    try:
        return bool(node.is_impure())
    except Exception:
        return True


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _capture(model: nn.Module, runner: nn.Module) -> tuple[fx.Graph, nn.Module, dict[str, Any]]:
    """The graph to run, the module its targets resolve on, and trace-time tensor constants."""
    if isinstance(runner, fx.GraphModule):
        return runner.graph, runner, {}
    before = set(vars(model))
    try:
        graph = _Tracer().trace(model)
    finally:
        # fx stores tensors built during tracing on the traced module; take them back off
        added = {k: vars(model)[k] for k in set(vars(model)) - before}
        for k in added:
            delattr(model, k)
    return graph, model, added


def _binder(
    graph: fx.Graph, forward: Callable[..., Any], placeholders: list[fx.Node]
) -> Callable[[tuple[Any, ...], dict[str, Any]], list[Any]] | str:
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return "the model's forward has no readable signature"
    kinds = {p.kind for p in signature.parameters.values()}
    if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return "the model's forward takes *args/**kwargs"
    codegen = graph._codegen
    pytree = type(codegen).__name__ == "_PyTreeCodeGen"
    if not pytree and len(signature.parameters) != len(placeholders):
        return "the graph's inputs do not match the forward's parameters"

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())
        if pytree:
            values = list(codegen.process_inputs(*values))
        if len(values) != len(placeholders):
            raise TypeError(f"{len(values)} inputs for {len(placeholders)} graph inputs")
        return values

    return bind


def plan_frontier(
    model: nn.Module,
    runner: nn.Module,
    sites: list[Site],
    levels: list[int],
    calls: list[int] | None,
) -> FrontierPlan | str:
    """The segment plan of ``runner``'s graph, or why population mode cannot use one."""
    if calls is None:
        return "no probe batch"
    try:
        graph, root, added = _capture(model, runner)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch.fx could not trace the model ({type(e).__name__}: {first[:120]})"
    pass_of = {lv: k + 1 for k, lv in enumerate(sorted(set(levels)))}
    site_of = {id(s.module): i for i, s in enumerate(sites)}
    modules: dict[fx.Node, nn.Module] = {}
    consts: dict[fx.Node, Any] = {}
    bn_site: dict[fx.Node, int] = {}
    placeholders: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "call_module":
            try:
                modules[node] = root.get_submodule(str(node.target))
            except AttributeError:
                return f"the graph calls a module it cannot resolve ({node.target})"
            if id(modules[node]) in site_of:
                bn_site[node] = site_of[id(modules[node])]
        elif node.op == "get_attr":
            target = str(node.target)
            if target in added:
                consts[node] = added[target]
                continue
            obj: Any = root
            try:
                for part in target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                return f"the graph reads an attribute it cannot resolve ({target})"
            consts[node] = obj
        elif node.op == "placeholder":
            placeholders.append(node)
    called = {id(m) for m in modules.values()}
    for name, sub in root.named_modules():
        # tracing goes through a module's forward, not its __call__: its hooks would not run
        if sub is not root and id(sub) not in called and _has_hooks(sub):
            return f"module {name!r} has forward hooks, which the traced graph would skip"
    if [bn_site[n] for n in graph.nodes if n in bn_site] != calls:
        return "the captured graph does not call the BatchNorms the model calls"
    segment: dict[fx.Node, int] = {}
    measured: dict[int, list[tuple[fx.Node, int]]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            segment[node] = 0
            continue
        if node.op == "output":
            continue
        ready = max((segment[a] for a in node.all_input_nodes), default=0)
        if node in bn_site:
            k = pass_of[levels[bn_site[node]]]
            if ready > k:
                return (
                    f"BatchNorm {sites[bn_site[node]].name!r} reads the output of a BatchNorm "
                    "of its own level (a module reused in a chain)"
                )
            measured.setdefault(k, []).append((node, bn_site[node]))
            segment[node] = k + 1
        else:
            segment[node] = max(ready, 1)
    needed: set[fx.Node] = set()
    stack = [a for n in bn_site for a in n.all_input_nodes]
    while stack:
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        # an in-place op on a needed value is needed too, though nothing reads its result,
        # and so are checks with no result (ExportedProgram.module()'s input guards, asserts)
        for node in graph.nodes:
            if node not in needed and node.op not in ("output", "placeholder"):
                written = _mutated_arg(node, modules)
                writes_needed = written is True or (
                    isinstance(written, fx.Node) and written in needed
                )
                if writes_needed or (not node.users and _impure(node)):
                    stack.append(node)
    order = [n for n in graph.nodes if n in needed and n.op not in ("placeholder", "get_attr")]
    for node in order:
        written = _mutated_arg(node, modules)
        if written is None:
            continue
        if written is True or not isinstance(written, fx.Node):
            return f"in-place op {node.name} writes a value it does not name"
        # the write lands on the tensor behind any pass-through (Identity, eval-mode
        # dropout), so every name of that tensor must stay within the op's segment
        base = _alias_root(written, modules)
        aliases = _aliases(base, modules)
        same = all(
            segment.get(u, -1) == segment[node] for a in aliases for u in a.users if u in needed
        )
        if (
            base.op in ("placeholder", "get_attr")
            or segment[base] != segment[node]
            or not same
            or not _fresh(base, modules)
        ):
            return f"in-place op {node.name} writes a value other segments may read"
    forward = runner.forward
    bind = _binder(graph, forward, placeholders)
    if isinstance(bind, str):
        return bind
    return FrontierPlan(
        caller=model,
        placeholders=placeholders,
        bind=bind,
        segment=segment,
        consts=consts,
        modules=modules,
        measured=measured,
        order=order,
        passes=max(measured, default=0),
        readers=needed | set(placeholders) | set(bn_site),
    )
