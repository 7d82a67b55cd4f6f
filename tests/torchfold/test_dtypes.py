"""fp16 / bf16 folds: every folded parameter is the float64 result rounded once.

The reference is computed here independently of the math core (torch float64 arithmetic), and
"rounded once" is checked as *nearest*: no neighbouring value of the dtype is closer to the
exact float64 result than the stored one.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bnfold.torchfold import fold_torch

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _neighbours(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next representable values below and above |v| (same sign), by bit pattern."""
    bits = v.view(_BITS[v.dtype])
    return (bits - 1).view(v.dtype), (bits + 1).view(v.dtype)


def _assert_nearest(stored: torch.Tensor, exact: torch.Tensor) -> None:
    stored, exact = stored.detach().reshape(-1), exact.reshape(-1)
    here = (stored.double() - exact).abs()
    for other in _neighbours(stored):
        finite = torch.isfinite(other.double())
        assert bool((here[finite] <= (other.double() - exact).abs()[finite]).all())


@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    kind=st.sampled_from(["conv", "conv_transpose", "linear"]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_half_precision_params_are_float64_rounded_once(dtype, kind, groups, bias, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = 4, 6
    if kind == "conv":
        layer = nn.Conv2d(c_in, c_out, 3, groups=groups, bias=bias)
        x = torch.randn(1, c_in, 5, 5, generator=gen)
    elif kind == "conv_transpose":
        layer = nn.ConvTranspose2d(c_in, c_out, 3, groups=groups, bias=bias)
        x = torch.randn(1, c_in, 5, 5, generator=gen)
    else:
        layer = nn.Linear(c_in, c_out, bias=bias)
        x = torch.randn(3, c_in, generator=gen)
    bn = nn.BatchNorm2d(c_out) if kind != "linear" else nn.BatchNorm1d(c_out)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(c_out, generator=gen))
        bn.running_var.copy_(torch.rand(c_out, generator=gen) * 3 + 1e-3)
        bn.weight.copy_(torch.randn(c_out, generator=gen) * 4)
        bn.bias.copy_(torch.randn(c_out, generator=gen))
    model = nn.Sequential(layer, bn).eval().to(dtype)
    folded, report = fold_torch(model, x.to(dtype))
    assert report.decisions[0].folded

    w, b = layer.weight.double(), layer.bias.double() if bias else torch.zeros(c_out).double()
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - bn.running_mean.double() * s
    if kind == "conv_transpose":
        per = c_out // groups
        scale = s.reshape(groups, 1, per).expand(groups, c_in // groups, per).reshape(c_in, per)
        w_exact = w * scale.reshape(c_in, per, 1, 1)
    else:
        w_exact = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b_exact = b * s + t
    _assert_nearest(folded[0].weight, w_exact)
    _assert_nearest(folded[0].bias, b_exact)
    assert folded[0].weight.dtype == dtype and folded[0].bias.dtype == dtype


def test_nearest_check_rejects_a_value_off_by_one_ulp() -> None:
    exact = torch.tensor([1.0 + 2.0**-9], dtype=torch.float64)  # fp16 grid step at 1 is 2**-10
    good = exact.to(torch.float16)
    bad = _neighbours(good)[1]
    _assert_nearest(good, exact)
    try:
        _assert_nearest(bad, exact)
    except AssertionError:
        return
    raise AssertionError("a value one ulp away passed the nearest check")


def test_numpy_reference_agrees_on_float16() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    _assert_nearest(torch.from_numpy(x.astype(np.float16)), torch.from_numpy(x))
