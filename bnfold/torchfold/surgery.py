"""Give back the user's own module when the folds were found in a torch.export graph.

torch.export traces into every module, so its graph spells a ``BatchNorm2d`` as an aten
batch-norm op on ``<path>.running_mean`` and a ``Conv2d`` as ``aten.conv2d`` on
``<path>.weight``; the parameter names are the user's ``state_dict`` names. When every fold
joined such a BN module to such a layer module, the fold is exactly module surgery on the
user's model: store the folded parameters under the same names and put what stays of the BN
(:func:`bnfold.torchfold.bnlike.after_fold`) at its path. That model accepts every input shape
its class accepts, where the exported graph is specialised to the example's shapes.

A fold counts as surgery only when the graph proves it:

- the BN op was called by the BN-like module that owns its statistics (the last entry of the
  node's ``nn_module_stack`` is that module), and the module's forward is a known table entry
  (its whole forward is the affine map, then its ``drop``/``act``);
- the layer op was called by the Conv/Linear module that owns its weight, a torch class with
  its own forward (so the module computes exactly that op);
- a forward fold's BN leaves nothing after its affine map.

The guards have already ruled out shared modules and tensors used at several sites.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from bnfold.sites import Direction, FoldDecision
from bnfold.torchfold import bnlike
from bnfold.torchfold.discover import Site
from bnfold.torchfold.ops import ParamRef

__all__ = ["surgery_from_graph"]


def _caller(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    entries = [v for v in stack.values() if isinstance(v, tuple) and v]
    return str(entries[-1][0]) if entries else None


def _is_plain_layer(module: nn.Module) -> bool:
    if type(module) in (nn.Linear,) or (
        isinstance(module, _ConvNd) and type(module).__module__.startswith("torch.nn")
    ):
        return not nn.utils.parametrize.is_parametrized(module)
    return False


def _provable(site: Site, model: nn.Module) -> bool:
    bn, layer = site.bn, site.layer
    if layer is None or layer.weight is None or bn.mean is None or bn.mean.attr != "running_mean":
        return False
    path = bn.mean.owner
    try:
        bn_module = model.get_submodule(path)
        layer_module = model.get_submodule(layer.weight.owner)
    except AttributeError:
        return False
    if bnlike.spec_of(bn_module) is None or _caller(bn.node) != path:
        return False
    if site.direction is Direction.FORWARD and bnlike.kept_after(bn_module):
        return False
    return (
        _is_plain_layer(layer_module)
        and layer.weight.attr == "weight"
        and _caller(layer.node) == layer.weight.owner
    )


def surgery_from_graph(
    model: nn.Module, gm: fx.GraphModule, folded: list[Site], decisions: list[FoldDecision]
) -> nn.Module | None:
    """A copy of ``model`` carrying the folds made in its export graph ``gm``, or None when
    a fold cannot be proved to be module surgery (see the module docstring)."""
    if not folded or not all(_provable(s, model) for s in folded):
        return None
    out = copy.deepcopy(model)
    for d in decisions:
        if not d.folded:
            continue
        for name in d.params:
            ref = ParamRef.from_target(name)
            value = ref.get(gm)
            owner = out.get_submodule(ref.owner)
            if not isinstance(value, nn.Parameter) or not _is_plain_layer(owner):
                return None
            owner.register_parameter(ref.attr, nn.Parameter(value.detach().clone()))
    for s in folded:
        assert s.bn.mean is not None
        path = s.bn.mean.owner
        bnlike.put_after_fold(out, path)
    return out
