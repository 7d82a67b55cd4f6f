"""The folds through an operation on ONNX files as ``torch.onnx.export`` writes them.

Each network is exported (dynamo exporter, as ``bnfold export`` does), folded, run by
onnxruntime, and compared with the PyTorch original run in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnxfold_util import bn_count, max_rel_error, run
from torch import nn

from bnfold.onnxfold import fold_onnx
from bnfold.sites import SkipCode


class ConvAddBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, bias=False)
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x) + self.shift))


class MixConv(nn.Module):
    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 3, k, padding=k // 2) for k in (3, 5))
        self.bn = nn.BatchNorm2d(6)
        self.reuse = reuse
        self.after = nn.Conv2d(3, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, 2, 1)
        outs = [c(parts[i]) for i, c in enumerate(self.convs)]
        y = F.relu(self.bn(torch.cat(outs, 1)))
        return y + self.after(outs[0]) if self.reuse else y


class LinearNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return F.hardswish(self.bn(x.flatten(0, 1)).reshape_as(x))


class PoolHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(F.gelu(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _randomised(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))
    return net.eval()


@pytest.mark.parametrize(
    ("net", "shape", "left"),
    [
        (ConvAddBN, (2, 4, 8, 8), 0),
        (MixConv, (2, 4, 8, 8), 0),
        (LinearNorm, (2, 5, 4), 0),
        (PoolHead, (2, 4, 8, 8), 0),
        (lambda: MixConv(reuse=True), (2, 4, 8, 8), 1),
    ],
    ids=["conv-add-bn", "mixconv", "levit-linearnorm", "pool-head", "densenet-reuse"],
)
def test_exported_network_folds_exactly(net, shape, left) -> None:
    module = _randomised(net())
    x = torch.randn(shape)
    with torch.no_grad():
        ref = module.double()(x.double()).numpy()
        module.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    assert program is not None
    model = program.model_proto
    folded, report = fold_onnx(model)
    assert bn_count(folded) == left
    got = run(folded, {model.graph.input[0].name: x.numpy()})
    assert max_rel_error([ref], [np.asarray(got[0])]) <= 1e-5
    for d in report.skipped:
        assert d.code is SkipCode.MULTIPLE_USERS
        assert (d.reason or "").startswith("backward: through Concat")
