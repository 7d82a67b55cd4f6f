"""Batch mode's fused BN call: the moments and the normalised output from one read."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.recalib import kernels, stats
from bnfold.recalib.stats import affine_vectors, moments, normalised_moments


@pytest.fixture(autouse=True)
def _kernels_on() -> None:
    if os.environ.get("BNFOLD_NO_JIT") == "1":
        pytest.skip("the compiled kernels are switched off by BNFOLD_NO_JIT=1")
    assert kernels.available(), "numba is a dependency; the kernels must load"


def _scale_shift(mean, var, w, b, eps, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 per-channel factors of the normalisation, shaped to broadcast on axis 1."""
    shape = (1, -1) + (1,) * (dims - 2)
    scale = w / np.sqrt(var + eps)
    return torch.from_numpy(scale).view(shape), torch.from_numpy(b - mean * scale).view(shape)


SHAPES = [
    pytest.param((16, 6, 24, 24), False, id="long-runs"),
    pytest.param((16, 6, 5, 5), False, id="short-runs"),
    pytest.param((300, 12), False, id="features"),
    pytest.param((8, 5, 40), False, id="conv1d"),
    pytest.param((2, 3, 4, 16, 16), False, id="conv3d"),
    pytest.param((16, 6, 24, 24), True, id="channels-last"),
    # 67 channels of 64 KiB each (16 runs of 4 KiB): blocks of 32 channels, the last partial
    pytest.param((16, 67, 32, 32), False, id="many-blocks"),
]


@pytest.mark.parametrize(("shape", "channels_last"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_call_gives_the_moments_bits_and_the_batch_normalised_output(
    shape, channels_last, dtype, affine
):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=dtype) if affine else None
    vectors = affine_vectors(w, b, c)
    assert vectors is not None
    fused = normalised_moments(x, vectors, 1e-3)
    assert fused is not None
    n, mean, m2, y = fused
    n0, mean0, m20 = moments(x, 1)
    assert n == n0
    assert np.array_equal(mean, mean0) and np.array_equal(m2, m20)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    scale, shift = _scale_shift(mean, m2 / n, *vectors, 1e-3, x.dim())
    ref = x.double() * scale + shift
    # scale and shift are rounded once to x's dtype, then y = x * scale + shift in that dtype
    bound = 4 * torch.finfo(dtype).eps * ((x.double() * scale).abs() + shift.abs())
    assert bool(((y.double() - ref).abs() <= bound).all())
    # and it is what batch_norm computes from the same statistics, to rounding
    torch.testing.assert_close(
        y,
        F.batch_norm(
            x,
            torch.from_numpy(mean).to(dtype),
            torch.from_numpy(m2 / n).to(dtype),
            w,
            b,
            False,
            0.0,
            1e-3,
        ),
    )


@pytest.mark.parametrize("samples", [32, 7, 2])  # split by samples; by channels below 3
def test_fused_call_does_not_depend_on_thread_count(samples, monkeypatch):
    monkeypatch.setattr(kernels, "_PARTS_MIN", 1 << 8)  # split these inputs across threads
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 1 << 12)  # and into blocks of channels
    monkeypatch.setattr(kernels, "_RUN_BYTES", 1 << 12)
    monkeypatch.setattr(kernels._Parallel, "pid", 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(samples, 40, 9, 9, generator=g) + 1
    x[:, 5] += 1e4  # a channel far off centre, summed a second time about its mean
    vectors = affine_vectors(torch.rand(40, generator=g), torch.randn(40, generator=g), 40)
    assert vectors is not None
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        out = normalised_moments(x, vectors, 1e-5)
        assert out is not None
        runs.append(out)
    assert kernels._Parallel.pid == os.getpid()  # the threaded kernel ran
    for _, mean, m2, y in runs[1:]:
        assert np.array_equal(mean, runs[0][1]) and np.array_equal(m2, runs[0][2])
        assert torch.equal(y, runs[0][3])


def test_fused_call_declines_what_it_cannot_read_in_place():
    x = torch.randn(4, 6, 8, 8)
    vectors = affine_vectors(None, None, 6)
    assert vectors is not None
    assert normalised_moments(x[:, :, ::2], vectors, 1e-5) is None  # strided, not dense
    assert normalised_moments(x.half(), vectors, 1e-5) is None  # half precision
    assert normalised_moments(x[:, :5], affine_vectors(None, None, 5), 1e-5) is None
    assert normalised_moments(x, affine_vectors(None, None, 5), 1e-5) is None  # wrong length
    assert affine_vectors(torch.ones(6).half(), None, 6) is None
    assert affine_vectors(torch.ones(5), None, 6) is None


def test_a_bns_fused_call_follows_changes_of_layout_and_parameters():
    """What :class:`FusedBatchNorm` keeps between calls (the input's layout, the float64
    weight and bias) is refreshed when the input or the parameters change: every call gives
    the bits of a fresh :func:`normalised_moments`, or declines as it does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 8, 8, generator=g) * 3 + 1
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    other = weight.clone()
    other[0] = 7.0  # a new tensor with the same shape (and maybe the same address)
    calls = [
        (x, weight, bias),
        (x.contiguous(memory_format=torch.channels_last), weight, bias),  # new layout
        (x[:, :, ::2], weight, bias),  # strided: declined
        (x[:2], weight, bias),  # new shape
        (x.double(), weight, bias),  # new dtype
        (x, other, bias),  # new tensor
        (x, weight.mul_(2.0), bias),  # the same tensor, edited in place
        (x, None, None),
        (x[:, :4].contiguous(), weight, bias),  # a misshapen weight: declined
    ]
    call = stats.FusedBatchNorm(1e-5)
    for i, (inp, w, b) in enumerate(calls):
        got = call(inp, w, b)
        vectors = affine_vectors(w, b, inp.shape[1])
        want = None if vectors is None else normalised_moments(inp, vectors, 1e-5)
        assert (got is None) == (want is None), i
        if got is not None and want is not None:
            assert got[0] == want[0], i
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2]), i
            assert torch.equal(got[3], want[3]), i
            assert got[3].stride() == inp.stride(), i
    assert call(x[:, :, ::2], weight, bias) is None


class _BumpsItsWeight(nn.Module):
    """bn1's weight is changed in place before every call; bn2 measures bn1's output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2: nn.Module = nn.Sequential(
            nn.BatchNorm2d(channels), nn.Conv2d(channels, 4, 1), nn.BatchNorm2d(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.bn1.weight.add_(1.0)
        return self.bn2(self.bn1(x))


def test_batch_mode_fused_and_two_step_paths_agree(monkeypatch):
    """The fused path's statistics match the two-step path's to float32 rounding, also
    when a forward edits a BN's weight in place (the cached float64 weight is refreshed)."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 3, 10, 10, generator=g) * 2 + 1 for _ in range(4)]

    def run(fused: bool) -> tuple[nn.Module, bnfold.RecalibrationReport]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), _BumpsItsWeight(8))
        calls: list[object] = []
        real = stats._normalise

        def spy(*a: object) -> object:
            calls.append(a)
            return real(*a) if fused else None

        with monkeypatch.context() as m:
            m.setattr(stats, "_normalise", spy)
            report = bnfold.recalibrate(net.eval(), data, mode="batch", progress=False)
        assert calls  # the fused call was offered every non-final BN call
        return net, report

    fused_net, _ = run(True)
    plain_net, _ = run(False)
    bns = [m for m in fused_net.modules() if isinstance(m, nn.BatchNorm2d)]
    ref = [m for m in plain_net.modules() if isinstance(m, nn.BatchNorm2d)]
    # the first BN sees the data itself: the same bits either way
    assert torch.equal(bns[0].running_mean, ref[0].running_mean)
    assert torch.equal(bns[0].running_var, ref[0].running_var)
    for a, b in zip(bns, ref, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
