"""The folds through an operation on ONNX files as ``torch.onnx.export`` writes them.

Each network is exported (dynamo exporter, as ``bnfold export`` does), folded, run by
onnxruntime, and compared with the PyTorch original run in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from onnxfold_util import bn_count, max_rel_error, run
from torch import nn

from bnfold.models.patterns import ConvAddBN, LinearNorm, MixConv, PoolHead
from bnfold.onnxfold import fold_onnx
from bnfold.sites import SkipCode


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
