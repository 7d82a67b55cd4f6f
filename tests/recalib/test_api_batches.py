"""The Python API takes the batches the CLI takes: float64 and uint8 inputs are cast, and said."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import bnfold
from bnfold.models import build


def _stats(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.state_dict().items() if "running" in k}


@pytest.mark.parametrize("mode", ["population", "batch"])
def test_float64_batches_are_cast_with_a_warning(mode):
    model, example = build("mlp")
    g = torch.Generator().manual_seed(0)
    x32 = [torch.randn(6, *example.shape[1:], generator=g) for _ in range(2)]
    ref = copy.deepcopy(model)
    bnfold.recalibrate(ref, x32, mode=mode, progress=False)
    with pytest.warns(UserWarning, match="float64 batches are cast to float32"):
        bnfold.recalibrate(model, [(x.double().numpy(), 0) for x in x32], mode=mode, progress=False)
    for k, v in _stats(ref).items():
        assert torch.equal(_stats(model)[k], v), k


def test_uint8_images_warn_that_they_are_unscaled():
    model, example = build("resnet-mini")
    g = np.random.default_rng(0)
    images = [g.integers(0, 256, (4, *example.shape[1:]), dtype=np.uint8) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"uint8 batches .* unscaled \(0-255\)"):
        r = bnfold.recalibrate(model, iter(images), progress=False)
    assert r.samples == 8
    # the first BN sees conv1 of the raw 0-255 values (not scaled behind the user's back)
    assert r.bns[0].new_var_mean > 100 * r.bns[0].old_var_mean
