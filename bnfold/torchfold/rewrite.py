"""Apply one fold to an fx graph: new parameters from :mod:`bnfold.foldmath`, BN node removed.

The arithmetic is not here: parameters go to numpy float64, through ``fold_backward`` /
``fold_forward``, and come back rounded once by ``round_to`` to the dtype the layer stores
(bfloat16 via float32, which represents every bfloat16 exactly). New tensors *replace* the
old ones (never an in-place write), so a tensor object the caller still holds keeps its
values. The BN's output is then rewired to its input and the BN nodes are erased; a BN-like
layer with an activation after its affine map keeps its call, with the module at its path
replaced by what stays (:func:`bnfold.torchfold.bnlike.after_fold`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import fx, nn

from bnfold import foldmath
from bnfold.sites import Direction, FoldDecision
from bnfold.torchfold.bnlike import after_fold
from bnfold.torchfold.discover import Site
from bnfold.torchfold.ops import BatchNorm, Layer, ParamRef

__all__ = ["apply_fold", "prune", "to_torch"]

_NUMPY = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def to_torch(x64: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``x64`` rounded once to ``like``'s dtype, on ``like``'s device."""
    if like.dtype == torch.bfloat16:
        exact = foldmath.round_to(x64, ml_dtypes.bfloat16).astype(np.float32)
        out = torch.from_numpy(np.ascontiguousarray(exact)).to(torch.bfloat16)
    else:
        out = torch.from_numpy(np.ascontiguousarray(foldmath.round_to(x64, _NUMPY[like.dtype])))
    return out.to(like.device)


def _f64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _tensor(ref: ParamRef | None, gm: fx.GraphModule) -> torch.Tensor | None:
    value = ref.get(gm) if ref is not None else None
    return value if isinstance(value, torch.Tensor) else None


def _required(ref: ParamRef | None, gm: fx.GraphModule) -> torch.Tensor:
    """A tensor the guards already proved present (running statistics, the layer weight)."""
    value = _tensor(ref, gm)
    if value is None:
        raise AssertionError(f"{ref} should hold a tensor once the guards passed")
    return value


def _layout(layer: Layer) -> foldmath.WeightLayout:
    if layer.kind == "linear":
        return foldmath.LINEAR
    base = foldmath.CONV_TRANSPOSE if layer.kind == "conv_transpose" else foldmath.CONV
    return base.with_groups(layer.groups)


def _bias_ref(layer: Layer, gm: fx.GraphModule) -> ParamRef:
    """Where a layer without a bias gets one (a get_attr node is added for functional ones)."""
    if layer.bias is not None:
        return layer.bias
    assert layer.weight is not None
    if layer.module is not None:
        return ParamRef(layer.module, "bias")
    owner = gm.get_submodule(layer.weight.owner)
    base = layer.weight.attr.replace("weight", "bias")
    attr = base if base != layer.weight.attr else f"{base}_bias"
    n = 0
    while hasattr(owner, attr):
        n += 1
        attr = f"{base}_{n}"
    ref = ParamRef(layer.weight.owner, attr)
    weight = layer.weight.get(gm)
    ref.set(gm, torch.zeros(0), parameter=isinstance(weight, nn.Parameter))
    with gm.graph.inserting_before(layer.node):
        getter = gm.graph.get_attr(ref.name)
    node = layer.node
    if node.target is torch.ops.aten.mm.default:  # mm(x, t(W)) becomes addmm(b, x, t(W))
        node.target = torch.ops.aten.addmm.default
        node.args = (getter, *node.args)
    elif len(node.args) > layer.bias_index:
        node.update_arg(layer.bias_index, getter)
    else:
        node.update_kwarg("bias", getter)
    return ref


Exact = dict[str, tuple[int, np.ndarray]]


def _exact(ref: ParamRef | None, gm: fx.GraphModule, exact: Exact) -> np.ndarray | None:
    """A parameter in float64: the unrounded result of an earlier fold when it wrote the
    tensor stored now, else the stored tensor itself."""
    value = _tensor(ref, gm)
    if value is None or ref is None:
        return None
    kept = exact.get(ref.name)
    if kept is not None and kept[0] == id(value):
        return kept[1]
    return _f64(value)


def bn_affine_of(bn: BatchNorm, gm: fx.GraphModule) -> foldmath.Affine:
    """The float64 affine map of ``bn`` from its stored statistics (every fold starts here)."""
    return foldmath.bn_affine(
        _required(bn.mean, gm).detach().to("cpu", torch.float64).numpy(),
        _required(bn.var, gm).detach().to("cpu", torch.float64).numpy(),
        bn.eps,
        _f64(_tensor(bn.gamma, gm)),
        _f64(_tensor(bn.beta, gm)),
    )


def apply_fold(
    site: Site,
    gm: fx.GraphModule,
    origin: dict[str, list[str]],
    exact: Exact | None = None,
) -> FoldDecision:
    """Fold ``site`` (already judged exact) into ``gm`` and return its decision.

    Args:
        site: a site whose facts passed :func:`bnfold.guards.check`.
        gm: the graph module to edit.
        origin: parameter name -> original parameter names it was computed from; updated
            here so a second fold into the same layer reports every BN it absorbed.
        exact: parameter name -> (id of the stored tensor, its float64 value before
            rounding); updated here so a second fold into the same layer (Conv -> BN -> BN)
            starts from the float64 result and the stored value is still rounded only once.
    """
    exact = {} if exact is None else exact
    bn, layer = site.bn, site.layer
    assert layer is not None and layer.weight is not None
    affine = bn_affine_of(bn, gm)
    weight = _required(layer.weight, gm)
    bias = _tensor(layer.bias, gm)
    w_f64 = _exact(layer.weight, gm, exact)
    b_f64 = _exact(layer.bias, gm, exact)
    assert w_f64 is not None
    layout = _layout(layer)
    if site.direction is Direction.BACKWARD:
        w64, b64 = foldmath.fold_backward(w_f64, b_f64, affine, layout)
    else:
        w64, b64 = foldmath.fold_forward(w_f64, b_f64, affine, layout, site.repeat)
    scale_names = [r.name for r in (bn.gamma, bn.var) if r is not None]
    bn_names = [r.name for r in (bn.gamma, bn.beta, bn.mean, bn.var) if r is not None]
    w_name = layer.weight.name
    w_origin = origin.get(w_name, [w_name])
    b_origin = origin.get(layer.bias.name, [layer.bias.name]) if layer.bias is not None else []
    bias_ref = _bias_ref(layer, gm)
    is_param = isinstance(weight, nn.Parameter)
    layer.weight.set(gm, to_torch(w64, weight), parameter=is_param)
    bias_like = bias if bias is not None else weight
    bias_ref.set(gm, to_torch(b64, bias_like), parameter=isinstance(bias_like, nn.Parameter))
    for ref, value in ((layer.weight, w64), (bias_ref, b64)):
        exact[ref.name] = (id(ref.get(gm)), value)
    # W' = W * s needs only gamma and var; b' needs the whole BN (and, forward, W as well).
    w_sources = w_origin + scale_names
    if site.direction is Direction.BACKWARD:
        b_sources = b_origin + bn_names
    else:
        b_sources = b_origin + w_origin + bn_names
    origin[w_name] = _unique(w_sources)
    origin[bias_ref.name] = _unique(b_sources)
    tensor = bn.out.name if site.direction is Direction.BACKWARD else layer.node.name
    if bn.keeps:
        # A BN+activation layer: its call stays, now running only what follows the affine map
        # (guards allow this backward only, where that part reads the folded layer's output).
        assert bn.module is not None
        gm.set_submodule(bn.module, after_fold(gm.get_submodule(bn.module)))
    else:
        bn.out.replace_all_uses_with(bn.input)  # type: ignore[arg-type]
        for node in dict.fromkeys([*bn.trailing, bn.out, bn.node]):
            if node.graph is gm.graph and not node.users:
                gm.graph.erase_node(node)
    return FoldDecision.fold(
        bn.name,
        site.direction,
        layer.site,
        params={w_name: origin[w_name], bias_ref.name: origin[bias_ref.name]},
        tensor=tensor,
    )


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def prune(gm: fx.GraphModule) -> None:
    """Drop the graph's now unused get_attr nodes, tensors and modules, and recompile."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    live = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner = name.rpartition(".")[0]
        inside_module = any(owner == m or owner.startswith(m + ".") for m in used_modules)
        if name not in live and not inside_module:
            ref = ParamRef.from_target(name)
            mod = gm.get_submodule(ref.owner)
            mod._parameters.pop(ref.attr, None)
            mod._buffers.pop(ref.attr, None)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
