"""Small networks with the BN patterns that need a fold *through* an operation.

Each reproduces, at toy size, a block of a real architecture: a Conv bias kept as a separate
Add (paddle2onnx, PP-OCR), MixConv's channel concat of convs (timm mixnet), LeViT's
LinearNorm (Linear -> flatten -> BatchNorm1d -> reshape) and ConvMixer's head (BN after the
activation, then pooling and a classifier). ``MixConv(reuse=True)`` is the near miss: a
concat input that another layer reads too (DenseNet), so its BN must stay.

Used by the tests and by ``bench/onnx_fold.py --patterns`` and ``bench/torch_fold.py``;
:func:`pattern_nets` builds them with randomised BN statistics, in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.models.nets import randomise_batchnorm

__all__ = ["ConvAddBN", "MixConv", "LinearNorm", "Levit", "PoolHead", "pattern_nets"]


class ConvAddBN(nn.Module):
    """A bias-less conv, its bias added as a parameter, then a BN."""

    def __init__(self, cin: int = 4, cout: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, bias=False)
        self.shift = nn.Parameter(torch.randn(1, cout, 1, 1))
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x) + self.shift))


class MixConv(nn.Module):
    """Two kernel sizes on two channel groups, one BN after the cat (``reuse``: DenseNet)."""

    def __init__(self, group: int = 2, per_conv: int = 3, reuse: bool = False) -> None:
        super().__init__()
        self.group = group
        self.convs = nn.ModuleList(nn.Conv2d(group, per_conv, k, padding=k // 2) for k in (3, 5))
        self.bn = nn.BatchNorm2d(2 * per_conv)
        self.reuse = reuse
        self.after = nn.Conv2d(per_conv, 2 * per_conv, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.group, 1)
        outs = [c(parts[i]) for i, c in enumerate(self.convs)]
        y = F.relu(self.bn(torch.cat(outs, 1)))
        return y + self.after(outs[0]) if self.reuse else y


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: the BN normalises the Linear's features after a flatten."""

    def __init__(self, cin: int = 4, cout: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Levit(nn.Module):
    """Two LinearNorms with an activation between, as in a LeViT attention block."""

    def __init__(self, dim: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.qkv, self.proj = LinearNorm(dim, hidden), LinearNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.hardswish(self.qkv(x)))


class PoolHead(nn.Module):
    """ConvMixer's head: conv, GELU, BN, average pool, flatten, classifier."""

    def __init__(self, cin: int = 4, channels: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.bn(F.gelu(self.conv(x)))), 1))


def pattern_nets(width: int = 1, seed: int = 0) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each pattern (and the reused-concat near miss) with an example input.

    Args:
        width: multiplies every channel count (benchmarks use wider nets than tests).
        seed: seeds the weights, the BN statistics and the inputs.
    """
    w = width
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = torch.randn(2, 4 * w, 8, 8, generator=gen)
        nets = {
            "Conv -> Add(constant) -> BN": (ConvAddBN(4 * w, 6 * w), image),
            "Concat of convs -> BN (MixConv)": (MixConv(2 * w, 3 * w), image),
            "Linear -> Reshape -> BN -> Reshape (LeViT)": (
                Levit(4 * w, 8 * w),
                torch.randn(2, 5, 4 * w, generator=gen),
            ),
            "BN -> GlobalAveragePool -> Flatten -> Gemm": (PoolHead(4 * w, 6 * w), image),
            "Concat with a reused input (must stay)": (MixConv(2 * w, 3 * w, reuse=True), image),
        }
    for net, _ in nets.values():
        randomise_batchnorm(net, gen)
        net.eval()
    return nets
