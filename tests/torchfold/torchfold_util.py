"""Shared helpers for the torch front-end tests: error measures and BN statistics."""

from __future__ import annotations

import torch
from torch import nn


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    return float((ref64 - out64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics (a fresh BN is the identity and would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen))
                    m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()
