"""Read fx nodes as BatchNorms and as foldable layers, whatever form they were traced in.

One graph can spell the same operation three ways: a ``call_module`` of an ``nn.Conv2d`` (fx
symbolic tracing keeps modules), a ``call_function`` of ``F.conv2d`` on ``get_attr`` weights
(functional code), or an aten op (``aten.conv2d.default``, ``aten.convolution.default``) in a
graph that came from ``torch.export``. This module turns each into one small record,
:class:`Layer` or :class:`BatchNorm`, whose parameters are :class:`ParamRef` (an owner module
path and an attribute), so discovery and rewriting never look at the spelling again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from bnfold.torchfold import bnlike

__all__ = [
    "ParamRef",
    "Layer",
    "BatchNorm",
    "as_layer",
    "as_batchnorm",
    "flatten_repeat",
    "shape_of",
    "is_bn_module",
    "parametrized",
    "call_site_name",
]

aten = torch.ops.aten

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
_CONVOLUTION_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_LINEAR_ARGS = ("input", "weight", "bias")
_DEFAULTS: dict[str, Any] = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "output_padding": 0,
    "weight": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
    "running_mean": None,
    "running_var": None,
}

# function -> (argument names, kind, spatial dims)
_LAYER_FUNCTIONS: dict[Any, tuple[tuple[str, ...], str, int]] = {
    F.conv1d: (_CONV_ARGS, "conv", 1),
    F.conv2d: (_CONV_ARGS, "conv", 2),
    F.conv3d: (_CONV_ARGS, "conv", 3),
    F.conv_transpose1d: (_CONVT_ARGS, "conv_transpose", 1),
    F.conv_transpose2d: (_CONVT_ARGS, "conv_transpose", 2),
    F.conv_transpose3d: (_CONVT_ARGS, "conv_transpose", 3),
    F.linear: (_LINEAR_ARGS, "linear", 0),
    aten.conv1d.default: (_CONV_ARGS, "conv", 1),
    aten.conv2d.default: (_CONV_ARGS, "conv", 2),
    aten.conv3d.default: (_CONV_ARGS, "conv", 3),
    aten.conv_transpose1d.default: (_CONVT_ARGS, "conv_transpose", 1),
    aten.conv_transpose2d.input: (_CONVT_ARGS, "conv_transpose", 2),
    aten.conv_transpose3d.input: (_CONVT_ARGS, "conv_transpose", 3),
    aten.linear.default: (_LINEAR_ARGS, "linear", 0),
    aten.convolution.default: (_CONVOLUTION_ARGS, "convolution", -1),
}

_BN_F = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_BN_LEGIT = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
# function -> (argument names, returns a tuple whose item 0 is the output)
_BN_FUNCTIONS: dict[Any, tuple[tuple[str, ...], bool]] = {
    F.batch_norm: (_BN_F, False),
    torch.batch_norm: (_BN_ATEN, False),
    aten.batch_norm.default: (_BN_ATEN, False),
    aten.native_batch_norm.default: (_BN_ATEN, True),
    aten._native_batch_norm_legit_no_training.default: (_BN_LEGIT, True),
}

_FLATTEN_FUNCTIONS = (torch.flatten, aten.flatten.using_ints)
_RESHAPE_FUNCTIONS = (
    torch.reshape,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
)


@dataclass(frozen=True)
class ParamRef:
    """A tensor stored as attribute ``attr`` of the submodule at path ``owner``."""

    owner: str
    attr: str

    @property
    def name(self) -> str:
        """The tensor's ``state_dict`` name."""
        return f"{self.owner}.{self.attr}" if self.owner else self.attr

    @classmethod
    def from_target(cls, target: str) -> ParamRef:
        owner, _, attr = target.rpartition(".")
        return cls(owner, attr)

    def get(self, root: nn.Module) -> torch.Tensor | None:
        return getattr(root.get_submodule(self.owner), self.attr, None)

    def set(self, root: nn.Module, value: torch.Tensor, *, parameter: bool) -> None:
        """Store ``value`` under this name, replacing the old tensor object (never in place:
        the old one may be shared with a module the caller still uses)."""
        owner = root.get_submodule(self.owner)
        if parameter:
            old = getattr(owner, self.attr, None)
            grad = old.requires_grad if isinstance(old, nn.Parameter) else True
            if self.attr in owner._buffers:
                del owner._buffers[self.attr]
            owner.register_parameter(self.attr, nn.Parameter(value, requires_grad=grad))
        else:
            if self.attr in owner._parameters:
                del owner._parameters[self.attr]
            owner.register_buffer(self.attr, value)


@dataclass
class Layer:
    """A Conv, ConvTranspose or Linear application that a BN can be folded into.

    Attributes:
        node: the fx node computing the layer.
        kind: ``conv``, ``conv_transpose`` or ``linear``.
        op: a readable name for messages (module path and class, or the function).
        module: the module path when the node is a ``call_module``.
        weight / bias: where the parameters live (None: not a stored tensor, or no bias).
        bias_arg: True when the layer takes a bias argument that is absent (may be added).
        non_constant: argument names whose values are computed or graph inputs.
        spatial: spatial dims (0 for Linear).
        groups: convolution groups.
        zero_padding: the zero padding amounts, or None when none is added.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        input: the node the layer reads as its activation input.
        bias_index: the bias's position in the node's arguments (0 for ``aten.addmm``).
        unsupported: why no BN can be folded into this layer, or None.
    """

    node: fx.Node
    kind: Literal["conv", "conv_transpose", "linear"]
    op: str
    module: str | None
    weight: ParamRef | None
    bias: ParamRef | None
    non_constant: list[str] = field(default_factory=list)
    spatial: int = 0
    groups: int = 1
    zero_padding: tuple[int, ...] | None = None
    padding_mode: str = "zeros"
    input: Any = None
    bias_index: int = 2
    unsupported: str | None = None

    @property
    def site(self) -> str:
        return self.module or self.node.name


@dataclass
class BatchNorm:
    """One BatchNorm application.

    Attributes:
        node: the op node; ``out`` is the node carrying its output (``getitem 0`` for aten
            ops returning a tuple) and ``trailing`` any other nodes to erase with it.
        name: the BN's module path in the user's model (:func:`call_site_name` for a
            functional or aten call).
        module: the module path when the node is a ``call_module``.
        input: the node the BN normalises.
        training: the BN normalises with batch statistics.
        running_stats: running mean and variance exist.
        mean / var / gamma / beta: parameter locations (gamma/beta None: ``affine=False``).
        eps: the variance epsilon.
        non_constant: statistics or affine parameters that are not stored tensors.
        unsupported: why this BN cannot be folded whatever its neighbours, or None.
        keeps: children of a BN-like module that run after its affine map (timm
            ``BatchNormAct2d``: ``drop``, ``act``) and stay in its place when it is folded.
    """

    node: fx.Node
    out: fx.Node
    name: str
    module: str | None
    input: fx.Node
    training: bool
    running_stats: bool
    mean: ParamRef | None
    var: ParamRef | None
    gamma: ParamRef | None
    beta: ParamRef | None
    eps: float
    trailing: list[fx.Node] = field(default_factory=list)
    non_constant: list[str] = field(default_factory=list)
    unsupported: str | None = None
    keeps: list[str] = field(default_factory=list)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The static shape fx ShapeProp or torch.export recorded for ``node``, or None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # symbolic dims: the rank is still known
        return tuple(-1 for _ in shape)


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    values = {n: _DEFAULTS.get(n) for n in names}
    for name, value in zip(names, node.args, strict=False):
        values[name] = value
    values.update({k: v for k, v in node.kwargs.items() if k in values})
    return values


def _own_forward(module: nn.Module, base: type) -> bool:
    """True when the module computes what its torch base class computes."""
    return type(module).forward in {
        getattr(cls, "forward", None)
        for cls in type(module).__mro__
        if issubclass(cls, base)
        if cls.__module__.startswith("torch.nn")
    }


#: Conv subclasses outside torch whose forward is known: timm's ``Conv2dSame`` (its ``tf_*``
#: models) zero-pads the input by an amount computed from the input size ("same" padding)
#: and then runs ``F.conv2d`` with its own weight and bias and no padding of its own. That
#: is linear in the weight and bias, so a BN after it folds exactly; a BN before it would
#: meet the zero padding, as with any zero-padded conv, so that direction is refused. Matched
#: on the exact class (module and name), so a subclass with another forward never is.
_SAME_PADDING_CONVS = {("timm.layers.conv2d_same", "Conv2dSame")}


def _same_padding_conv(module: nn.Module) -> bool:
    cls = type(module)
    return (
        (cls.__module__, cls.__qualname__) in _SAME_PADDING_CONVS
        and isinstance(module, _ConvNd)
        and not any(module.padding)
        and module.padding_mode == "zeros"
    )


def is_bn_module(module: nn.Module) -> bool:
    """A BatchNorm or BN-like module (see :mod:`bnfold.torchfold.bnlike`), known or refused."""
    return bnlike.is_bn_like(module)


def _tensor_arg(value: Any, name: str, non_constant: list[str]) -> ParamRef | None:
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return ParamRef.from_target(str(value.target))
    non_constant.append(getattr(value, "name", name))
    return None


def _as_tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _padding(
    padding: Any, weight: torch.Tensor | None, dilation: Any, spatial: int
) -> tuple[int, ...]:
    if isinstance(padding, str):
        if padding == "valid" or weight is None:
            return (0,) * spatial if padding == "valid" else (-1,)
        dil = _as_tuple(dilation, spatial)
        return tuple(d * (k - 1) for d, k in zip(dil, weight.shape[2:], strict=True))
    return _as_tuple(padding, spatial)


def _module_input(node: fx.Node) -> Any:
    """The activation a ``call_module`` node passes, positionally or as ``input=``."""
    return node.args[0] if node.args else node.kwargs.get("input")


def parametrized(module: nn.Module) -> str | None:
    """A sentence when ``module`` computes parameters with ``torch.nn.utils.parametrize``.

    Such a weight (weight norm, spectral norm, orthogonal, ...) is *derived* on every access
    from the stored originals, so a folded value cannot be written to it; writing to the
    originals would not scale the derived weight linearly. The layer is left as it is.
    """
    if not parametrize.is_parametrized(module):
        return None
    names = ", ".join(sorted(str(k) for k in getattr(module, "parametrizations", {})))
    return (
        f"{type(module).__name__}'s {names} is computed by a parametrization (e.g. weight "
        "norm), so a folded value cannot be stored; remove the parametrization "
        "(torch.nn.utils.parametrize.remove_parametrizations) before folding"
    )


def _through_transpose(node: Any) -> Any:
    """The weight behind ``aten.t`` / ``aten.permute(w, [1, 0])`` (``F.linear`` decomposed)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in (aten.t.default, aten.numpy_T.default):
        return node.args[0]
    args: Any = node.args
    if node.target is aten.permute.default and list(args[1]) == [1, 0]:
        return args[0]
    if node.target is aten.transpose.int and sorted(int(a) % 2 for a in args[1:3]) == [0, 1]:
        return args[0]
    return None


def _as_matmul_linear(node: fx.Node, root: nn.Module) -> Layer | None:
    """``aten.addmm(b, x, t(W))`` or ``aten.mm(x, t(W))`` (a decomposed Linear) as a Linear.

    Only the exact decomposition is accepted: a transposed stored 2-D weight as the second
    matrix and, for ``addmm``, ``beta == alpha == 1`` and a 1-D stored bias.
    """
    if node.target is aten.mm.default:
        x, mat2 = node.args[0], node.args[1]
        bias_node, index = None, 0
    else:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias_node, x, mat2 = node.args[0], node.args[1], node.args[2]
        index = 0
    weight_node = _through_transpose(mat2)
    if weight_node is None or not isinstance(weight_node, fx.Node):
        return None
    if weight_node.op != "get_attr" or len(mat2.users) != 1:  # type: ignore[union-attr]
        return None
    non_constant: list[str] = []
    bias = _tensor_arg(bias_node, "bias", non_constant)
    stored = bias.get(root) if bias is not None else None
    if stored is not None and stored.dim() != 1:  # a broadcast 2-D addend is not a bias
        return None
    op = f"{node.name} ({getattr(node.target, '__name__', str(node.target))})"
    return Layer(
        node,
        "linear",
        op,
        None,
        ParamRef.from_target(str(weight_node.target)),
        bias,
        non_constant,
        input=x,
        bias_index=index,
    )


def as_layer(node: fx.Node, root: nn.Module) -> Layer | None:
    """``node`` as a foldable layer, or None when it is anything else."""
    if node.op == "call_function" and node.target in (aten.addmm.default, aten.mm.default):
        return _as_matmul_linear(node, root)
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        path = str(node.target)
        op = f"{path} ({type(mod).__name__})"
        x = _module_input(node)
        if isinstance(mod, nn.Linear) and _own_forward(mod, nn.Linear):
            fc_bias = ParamRef(path, "bias") if mod.bias is not None else None
            return Layer(
                node,
                "linear",
                op,
                path,
                ParamRef(path, "weight"),
                fc_bias,
                input=x,
                unsupported=parametrized(mod),
            )
        same = _same_padding_conv(mod)
        if isinstance(mod, _ConvNd) and (same or _own_forward(mod, _ConvNd)):
            spatial = len(mod.kernel_size)
            kind = "conv_transpose" if mod.transposed else "conv"
            conv_bias = ParamRef(path, "bias") if mod.bias is not None else None
            # "same" as torch's own padding="same" is judged: the most it can add per side
            pad = _padding("same" if same else mod.padding, mod.weight, mod.dilation, spatial)
            return Layer(
                node,
                kind,  # type: ignore[arg-type]
                op,
                path,
                ParamRef(path, "weight"),
                conv_bias,
                spatial=spatial,
                groups=int(mod.groups),
                zero_padding=pad if any(pad) and mod.padding_mode == "zeros" else None,
                padding_mode=mod.padding_mode,
                input=x,
                unsupported=parametrized(mod),
            )
        return None
    if node.op != "call_function" or node.target not in _LAYER_FUNCTIONS:
        return None
    names, kind, spatial = _LAYER_FUNCTIONS[node.target]
    args = _bind(node, names)
    non_constant: list[str] = []
    weight = _tensor_arg(args["weight"], "weight", non_constant)
    bias = _tensor_arg(args["bias"], "bias", non_constant)
    w = weight.get(root) if weight is not None else None
    if kind == "convolution":
        kind = "conv_transpose" if args["transposed"] else "conv"
        spatial = w.dim() - 2 if w is not None else len(_as_tuple(args["stride"], 1))
    name = getattr(node.target, "__name__", str(node.target))
    op = f"{node.name} ({name})"
    if kind == "linear":
        return Layer(node, "linear", op, None, weight, bias, non_constant, input=args["input"])
    pad = _padding(args["padding"], w, args["dilation"], spatial)
    return Layer(
        node,
        kind,  # type: ignore[arg-type]
        op,
        None,
        weight,
        bias,
        non_constant,
        spatial=spatial,
        groups=int(args["groups"]),
        zero_padding=pad if any(pad) else None,
        input=args["input"],
    )


def as_batchnorm(node: fx.Node, root: nn.Module) -> BatchNorm | None:
    """``node`` as a BatchNorm application, or None."""
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if not is_bn_module(mod):
            return None
        path = str(node.target)
        spec = bnlike.spec_of(mod)
        mean, var = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
        stats = isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
        gamma, beta = getattr(mod, "weight", None), getattr(mod, "bias", None)
        unsupported = bnlike.refusal(mod) or parametrized(mod)
        return BatchNorm(
            node=node,
            out=node,
            name=path,
            module=path,
            input=_module_input(node),
            training=bool(mod.training) and not (spec is not None and spec.frozen),
            running_stats=stats,
            mean=ParamRef(path, "running_mean") if stats else None,
            var=ParamRef(path, "running_var") if stats else None,
            gamma=ParamRef(path, "weight") if isinstance(gamma, torch.Tensor) else None,
            beta=ParamRef(path, "bias") if isinstance(beta, torch.Tensor) else None,
            eps=float(getattr(mod, "eps", 1e-5)),
            unsupported=unsupported,
            keeps=bnlike.kept_after(mod),
        )
    if node.op != "call_function" or node.target not in _BN_FUNCTIONS:
        return None
    names, returns_tuple = _BN_FUNCTIONS[node.target]
    args = _bind(node, names)
    non_constant: list[str] = []
    refs = {k: _tensor_arg(args[k], k, non_constant) for k in ("running_mean", "running_var")}
    affine = {k: _tensor_arg(args[k], k, non_constant) for k in ("weight", "bias")}
    out, trailing, unsupported = node, [], None
    if returns_tuple:
        firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        others = [u for u in node.users if u not in firsts]
        if len(firsts) != 1 or any(u.users for u in others):
            unsupported = "the BN's saved-statistics outputs are used by the graph"
        if firsts:
            out = firsts[0]
        trailing = [u for u in node.users if u is not out]
    stats = args["running_mean"] is not None and args["running_var"] is not None
    training = args.get("training", False)
    if isinstance(training, fx.Node):
        unsupported = "the BN's training flag is computed at run time"
    return BatchNorm(
        node=node,
        out=out,
        name=call_site_name(node, refs["running_mean"]),
        module=None,
        input=args["input"],
        training=training is True,
        running_stats=stats,
        mean=refs["running_mean"],
        var=refs["running_var"],
        gamma=affine["weight"],
        beta=affine["bias"],
        eps=float(args["eps"]),
        trailing=trailing,
        non_constant=non_constant,
        unsupported=unsupported,
    )


def call_site_name(node: fx.Node, mean: ParamRef | None) -> str:
    """A functional or aten BN named as the user's model names it.

    Its statistics' owner when they are a module's ``running_mean`` (a ``BatchNorm2d``
    captured by torch.export is ``aten.batch_norm`` on ``layer1.0.bn1.running_mean``: it is
    ``layer1.0.bn1``, the ``state_dict`` prefix); else the statistics' own ``state_dict``
    name; else the module the call sits in and the call, ``block.0:batch_norm_2``.
    """
    if mean is not None:
        return mean.owner if mean.attr == "running_mean" and mean.owner else mean.name
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(v[0]) for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    return f"{paths[-1]}:{node.name}" if paths else node.name


def flatten_repeat(node: fx.Node, root: nn.Module, src_shape: tuple[int, ...] | None) -> int | None:
    """For a node flattening ``(N, C, *rest)`` into ``(N, C * prod(rest))``: ``prod(rest)``.

    None when ``node`` is not such a flatten or the shapes needed to prove it are unknown.
    """
    start: Any = None
    end: Any = None
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if type(mod) is nn.Flatten:
            start, end = mod.start_dim, mod.end_dim
    elif (node.op == "call_method" and node.target == "flatten") or (
        node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    elif (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("view", "reshape")
    ):
        out = shape_of(node)
        if src_shape is None or out is None or len(src_shape) < 2 or min(src_shape) < 0:
            return None
        if out == (src_shape[0], math.prod(src_shape[1:])):
            return math.prod(src_shape[2:])
        return None
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    if src_shape is None or len(src_shape) < 2:
        return None
    ndim = len(src_shape)
    if start % ndim != 1 or end % ndim != ndim - 1 or min(src_shape[2:], default=1) < 0:
        return None
    return math.prod(src_shape[2:])
