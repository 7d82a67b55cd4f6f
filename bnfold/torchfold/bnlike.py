"""BatchNorm-like layers: which modules compute a BN affine map in eval mode, and what stays.

A module is folded as a BatchNorm only when its *documented* eval-mode forward is known to be
``y = after(s * x + t)`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``
read from its own tensors, so that :func:`bnfold.foldmath.bn_affine` (the one place the
arithmetic lives) computes the fold for every entry. This table says, per class:

- where its mean, variance, gamma and beta live and what its epsilon is (every entry here
  stores them under the ``nn.BatchNorm2d`` names, so one reader serves all of them);
- whether it ever normalises with batch statistics (``frozen``: never);
- which child modules run *after* the affine map (``after``), and so stay when the map is
  folded into the layer before it: timm's ``BatchNormAct2d`` is ``act(drop(BN(x)))``, so a
  fold leaves ``act(drop(.))`` in its place, under the same module path.

| class | eval-mode forward | stays after a fold |
|---|---|---|
| ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` | BN with running statistics | nothing |
| ``timm.layers.norm_act.BatchNormAct2d`` | BN, then ``drop``, ``act`` | ``drop``, ``act`` |
| ``timm.layers.norm_act.SyncBatchNormAct`` | SyncBatchNorm, then ``drop``, ``act`` | the same |
| ``timm.layers.norm_act.FrozenBatchNormAct2d`` | ``x * scale + shift`` from buffers, ``drop``, ``act`` | the same |
| ``timm.layers.split_batchnorm.SplitBatchNorm2d`` | its primary BN (aux BNs are training-only), ``drop``/``act`` if converted | the same |
| ``torchvision.ops.misc.FrozenBatchNorm2d`` (also timm's) | ``x * scale + shift`` from buffers | nothing |

Classes are matched by qualified name (``module.qualname``), so timm and torchvision stay
optional imports. A subclass of a table entry counts as that entry only when it does not
override ``forward``; any other ``_BatchNorm`` subclass with its own ``forward`` is refused with
a reason (:func:`refusal`), because its output is not known to be the affine map.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BnLike",
    "TABLE",
    "spec_of",
    "is_bn_like",
    "refusal",
    "kept_after",
    "after_fold",
    "put_after_fold",
    "input_ranks",
    "KeptAfterFold",
]


@dataclass(frozen=True)
class BnLike:
    """How one BN-like class computes in eval mode.

    Attributes:
        qualname: ``module.QualName`` of the class that defines the forward.
        frozen: the layer always normalises with its stored statistics (no training mode).
        after: names of child modules applied, in order, after the affine map; a missing
            attribute is skipped (timm adds ``drop``/``act`` only to converted layers).
        ranks: input ranks the layer accepts (what proves a channel axis without shapes).
    """

    qualname: str
    frozen: bool = False
    after: tuple[str, ...] = ()
    ranks: frozenset[int] = frozenset(range(2, 9))


_DROP_ACT = ("drop", "act")
_RANK4 = frozenset({4})

TABLE: dict[str, BnLike] = {
    spec.qualname: spec
    for spec in (
        BnLike("torch.nn.modules.batchnorm._BatchNorm"),
        BnLike("torch.nn.modules.batchnorm.BatchNorm1d", ranks=frozenset({2, 3})),
        BnLike("torch.nn.modules.batchnorm.BatchNorm2d", ranks=_RANK4),
        BnLike("torch.nn.modules.batchnorm.BatchNorm3d", ranks=frozenset({5})),
        BnLike("torch.nn.modules.batchnorm.SyncBatchNorm"),
        BnLike("timm.layers.norm_act.BatchNormAct2d", after=_DROP_ACT, ranks=_RANK4),
        BnLike("timm.layers.norm_act.SyncBatchNormAct", after=_DROP_ACT),
        BnLike(
            "timm.layers.norm_act.FrozenBatchNormAct2d", frozen=True, after=_DROP_ACT, ranks=_RANK4
        ),
        BnLike("timm.layers.split_batchnorm.SplitBatchNorm2d", after=_DROP_ACT, ranks=_RANK4),
        # FrozenBatchNorm2d reshapes its buffers to (1, C, 1, 1): it broadcasts over 4-D input.
        BnLike("torchvision.ops.misc.FrozenBatchNorm2d", frozen=True, ranks=_RANK4),
    )
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _defining_class(module: nn.Module) -> type | None:
    """The class in ``module``'s MRO that defines the ``forward`` it runs."""
    forward = type(module).forward
    for cls in type(module).__mro__:
        if cls.__dict__.get("forward") is forward:
            return cls
    return None


def _in_table(module: nn.Module) -> bool:
    return any(_qualname(cls) in TABLE for cls in type(module).__mro__)


def spec_of(module: nn.Module) -> BnLike | None:
    """The table entry whose forward ``module`` runs, or None (not BN-like, or unknown forward).

    The nearest table class in the MRO gives the ranks and the ``after`` modules (a
    ``BatchNorm2d`` subclass that only adds an ``__init__`` is a ``BatchNorm2d``).
    """
    if "forward" in vars(module):  # a forward patched onto the instance
        return None
    owner = _defining_class(module)
    if owner is None or _qualname(owner) not in TABLE:
        return None
    for cls in type(module).__mro__:
        spec = TABLE.get(_qualname(cls))
        if spec is not None and issubclass(cls, owner):
            return spec
    return None


def is_bn_like(module: nn.Module) -> bool:
    """True for every module that is, or claims to be, a BatchNorm (known forward or not).

    Such a module is kept whole when tracing, so that it gets a decision of its own: folded,
    or refused with the reason :func:`refusal` gives.
    """
    return isinstance(module, _BatchNorm) or _in_table(module)


def refusal(module: nn.Module) -> str | None:
    """Why a BN-like ``module`` cannot be read as an affine map, or None when it can."""
    if spec_of(module) is not None:
        return None
    return (
        f"{type(module).__name__} overrides forward, so its output is not known to be "
        "the BatchNorm affine map"
    )


def input_ranks(module: nn.Module) -> set[int] | None:
    """Input ranks a BN-like module accepts, or None when ``module`` is not BN-like."""
    spec = spec_of(module)
    return set(spec.ranks) if spec is not None else None


def _trivial(module: nn.Module) -> bool:
    return type(module) is nn.Identity


def kept_after(module: nn.Module) -> list[str]:
    """Names of ``module``'s children that must run after its folded affine map.

    ``nn.Identity`` children are left out: nothing of them needs to stay.
    """
    spec = spec_of(module)
    if spec is None:
        return []
    kept = []
    for name in spec.after:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and not _trivial(child):
            kept.append(name)
    return kept


class KeptAfterFold(nn.Module):
    """What stays of a BN+activation layer once its BN part is folded: its children, in order.

    The children keep their attribute names (``drop``, ``act``), so their ``state_dict`` keys
    (a PReLU's weight: ``<path>.act.weight``) are the ones the user's model had.
    """

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x):  # type: ignore[no-untyped-def]
        for part in self.children():
            x = part(x)
        return x


def after_fold(module: nn.Module) -> nn.Module:
    """The module that replaces a folded BN-like ``module`` at its path.

    Nothing stays: ``nn.Identity``. One stateless child (the usual ``act``): that child
    itself, so a folded ``BatchNormAct2d(act=SiLU)`` costs one SiLU call, like the BN-free
    network. Otherwise a :class:`KeptAfterFold` holding the children under their names.
    """
    parts = {name: getattr(module, name) for name in kept_after(module)}
    if not parts:
        return nn.Identity()
    if len(parts) == 1:
        (only,) = parts.values()
        if not any(True for _ in only.parameters()) and not any(True for _ in only.buffers()):
            return only
    return KeptAfterFold(parts)


def put_after_fold(root: nn.Module, path: str) -> None:
    """Replace the folded BN-like layer at ``path`` of ``root`` by what stays of it.

    When nothing stays (:func:`after_fold` gives ``nn.Identity``) and the layer is an entry
    of a plain ``nn.Sequential`` (one that runs ``nn.Sequential.forward``), the entry is
    deleted instead: a Sequential calls its entries in order, so a deleted entry costs
    nothing where an Identity still costs a module call (1-2 us in eager, measured 14% of a
    folded three-layer MLP's latency and 3-5% on the small conv nets of ``models/``). The
    other entries keep their keys, so the model's state_dict keys are unchanged; positional
    indexing into that Sequential (``seq[i]``, ``len(seq)``) counts the entries that remain.
    """
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    replacement = after_fold(getattr(parent, name))
    if type(replacement) is nn.Identity and type(parent).forward is nn.Sequential.forward:
        del parent._modules[name]
        return
    setattr(parent, name, replacement)
