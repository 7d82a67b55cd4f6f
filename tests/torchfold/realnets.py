"""Real architectures for the torch front-end tests: timm and torchvision, random weights.

No weights are downloaded: every network is built with ``pretrained=False`` / ``weights=None``
and gets randomised BN statistics and affine parameters (a fresh BN is the identity map and
would hide a wrong fold). The foldable count is computed *independently* of bnfold's
discovery, by watching a real forward: a BN-like layer is counted when the tensor it
normalises is, object for object, the output of a Conv/Linear module called once (the shape of
a backward fold), which is every foldable BN in the networks listed here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from bnfold.torchfold.bnlike import is_bn_like


def randomise_bn_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters for every BN-like layer; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_bn_like(m) or getattr(m, "running_mean", None) is None:
                continue
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def bn_like_paths(model: nn.Module) -> list[str]:
    """Module paths of the BN-like layers a forward reaches (not nested in another one)."""
    out: list[str] = []
    for path, m in model.named_modules():
        if is_bn_like(m) and not any(path.startswith(p + ".") for p in out):
            out.append(path)
    return out


def backward_foldable(model: nn.Module, *args: Any) -> set[str]:
    """BN-like layers whose input is the output of a Conv/Linear module called once."""
    produced: dict[int, str] = {}
    alive: list[Any] = []  # tensors seen stay referenced, so no later tensor reuses their id
    calls: Counter[str] = Counter()
    bn_inputs: dict[str, int] = {}
    handles = []
    names = {id(m): p for p, m in model.named_modules()}
    for m in model.modules():
        if isinstance(m, (_ConvNd, nn.Linear)) and not getattr(m, "transposed", False):

            def after(mod: nn.Module, _inp: Any, out: Any) -> None:
                calls[names[id(mod)]] += 1
                produced[id(out)] = names[id(mod)]
                alive.append(out)

            handles.append(m.register_forward_hook(after))
        elif is_bn_like(m):

            def before(mod: nn.Module, inp: Any) -> None:
                bn_inputs.setdefault(names[id(mod)], id(inp[0]))
                alive.append(inp[0])

            handles.append(m.register_forward_pre_hook(before))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return {
        bn
        for bn, tid in bn_inputs.items()
        if tid in produced and calls[produced[tid]] == 1 and bn in set(bn_like_paths(model))
    }


def float64_error(
    model: nn.Module, candidate: nn.Module, *args: torch.Tensor
) -> tuple[float, float]:
    """Max error relative to the output scale against ``model`` in float64: (model, candidate).

    The first number is the unfolded model's own float32 error, the floor a fold is held to.
    """
    import copy

    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*(a.double() for a in args)).double()
        own = model(*args).double()
        out = candidate(*args).double()
    scale = ref.abs().max().clamp_min(1e-30)
    return float((own - ref).abs().max() / scale), float((out - ref).abs().max() / scale)
