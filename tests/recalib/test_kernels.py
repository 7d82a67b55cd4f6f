"""The compiled moment kernels against an exact-summation oracle and the torch path."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from bnfold.recalib import _jit, kernels
from bnfold.recalib.stats import batch_moments, torch_moments


def fsum_moments(x: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and M2 with correctly rounded sums (math.fsum), in float64."""
    rows = x.double().movedim(axis, 0).reshape(x.shape[axis], -1).numpy()
    means = np.array([math.fsum(r) / r.size for r in rows])
    m2 = np.array([math.fsum((r - m) ** 2) for r, m in zip(rows, means, strict=True)])
    return means, m2


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.fixture(autouse=True)
def _kernels_on() -> None:
    if os.environ.get("BNFOLD_NO_JIT") == "1":
        pytest.skip("the compiled kernels are switched off by BNFOLD_NO_JIT=1")
    assert kernels.available(), "numba is a dependency; the kernels must load"


LAYOUTS = [
    pytest.param((16, 6, 24, 24), 1, False, id="nchw-long-runs"),
    pytest.param((16, 6, 5, 5), 1, False, id="nchw-short-runs"),
    pytest.param((18, 6, 3, 3), 1, False, id="nchw-short-runs-rows-left-over"),
    pytest.param((300, 12), 1, False, id="features"),
    pytest.param((8, 5, 40), 1, False, id="conv1d"),
    pytest.param((2, 3, 4, 16, 16), 1, False, id="conv3d"),
    pytest.param((16, 6, 24, 24), 1, True, id="channels-last"),
    pytest.param((7, 9, 11), 2, False, id="channel-axis-last"),
    pytest.param((9, 7, 11), 0, False, id="channel-axis-first"),
]


@pytest.mark.parametrize(("shape", "axis", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kernels_match_exact_sums(shape, axis, channels_last, dtype, monkeypatch):
    g = torch.Generator().manual_seed(len(shape) * 31 + axis)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, m2 = fsum_moments(x, axis)
    calls = []
    real = kernels.moments
    monkeypatch.setattr(kernels, "moments", lambda *a: calls.append(a) or real(*a))
    n, got_mean, got_m2 = batch_moments(x, axis)
    assert len(calls) == 1  # the compiled path was taken, not the torch fallback
    assert n == x.numel() // x.shape[axis]
    assert rel(got_mean.numpy(), mean) <= 1e-12
    assert rel(got_m2.numpy(), m2) <= 1e-12
    _, t_m2 = torch_moments(x, axis)
    assert rel(got_m2.numpy(), t_m2.numpy()) <= 1e-12


@pytest.mark.parametrize("shape", [(32, 4, 20, 20), (32, 4, 3, 3), (30, 4, 3, 3), (500, 4)])
def test_channels_far_from_zero_are_summed_again_about_their_mean(shape):
    # mean / std = 1e5: raw sums of x and x^2 would cancel to noise; the kernels recentre
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-3
    offsets = torch.tensor([100.0, -250.0, 0.0, 3.0], dtype=torch.float64)
    x = (x + offsets.view(1, 4, *([1] * (len(shape) - 2)))).float()
    mean, m2 = fsum_moments(x, 1)
    _, got_mean, got_m2 = batch_moments(x, 1)
    assert rel(got_mean.numpy(), mean) <= 1e-12
    assert rel(got_m2.numpy(), m2) <= 1e-10


def test_constant_channel_has_zero_m2_exactly():
    x = torch.full((8, 3, 17, 17), 2.5)
    x[:, 1] = -1e4
    _, mean, m2 = batch_moments(x, 1)
    assert torch.equal(m2, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(mean, torch.tensor([2.5, -1e4, 2.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "shape",
    [
        (64, 24, 32, 32),  # long runs, split by samples
        (7, 24, 9, 9),  # long runs, samples not a multiple of the thread count
        (2, 24, 32, 32),  # long runs, fewer samples than threads: split by channels
        (64, 96, 7, 7),  # short runs, split by channels
    ],
)
def test_result_does_not_depend_on_thread_count(shape, monkeypatch):
    monkeypatch.setattr(kernels, "_PARTS_MIN", 1 << 8)  # split these inputs across threads
    monkeypatch.setattr(kernels._Parallel, "pid", 0)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) + 1).numpy().reshape(shape[0], shape[1], -1)
    x[:, 3] += 1e4  # a channel far off centre, summed a second time about its mean
    runs = [kernels.moments(x, threads) for threads in (1, 2, 3)]
    assert kernels._Parallel.pid == os.getpid()  # the threaded kernels ran
    for mean, m2 in runs[1:]:
        assert np.array_equal(mean, runs[0][0])
        assert np.array_equal(m2, runs[0][1])


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_leave_torch_thread_count_alone(threads, monkeypatch):
    monkeypatch.setattr(kernels, "_PARTS_MIN", 1 << 10)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        batch_moments(torch.randn(64, 32, 16, 16), 1)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def _child_moments(x: np.ndarray, out: Any) -> None:
    out.put(kernels.moments(x, 2)[0].tolist())


def test_a_child_forked_after_a_threaded_call_runs_serially(monkeypatch):
    """GNU OpenMP is not fork-safe (numba aborts a forked child that uses it): a child forked
    after the parent ran a threaded kernel must still get its moments."""
    import multiprocessing as mp

    monkeypatch.setattr(kernels, "_PARTS_MIN", 1 << 10)
    x = (torch.randn(16, 24, 32, 32) + 1).numpy().reshape(16, 24, -1)
    expected = kernels.moments(x, 2)[0]
    assert kernels._Parallel.pid == os.getpid()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_moments, args=(x, out))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert np.array_equal(np.array(out.get(timeout=5)), expected)


def test_threaded_kernels_fall_back_to_serial(monkeypatch):
    """A second caller while one threaded call runs, and a machine where no threading layer
    loads, both get the serial kernel's result (with one warning for the missing layer)."""
    import numba

    monkeypatch.setattr(kernels, "_PARTS_MIN", 1 << 10)
    monkeypatch.setattr(kernels._Parallel, "off", False)
    x = (torch.randn(16, 24, 32, 32) + 1).numpy().reshape(16, 24, -1)
    serial = kernels.moments(x, 1)
    with kernels._Parallel.lock:  # another thread is inside a threaded kernel
        busy = kernels.moments(x, 2)
    assert np.array_equal(busy[0], serial[0]) and np.array_equal(busy[1], serial[1])

    def no_layer(n: int) -> None:
        raise ValueError("No threading layer could be loaded.")

    monkeypatch.setattr(numba, "get_num_threads", lambda: -1)
    monkeypatch.setattr(numba, "set_num_threads", no_layer)
    with pytest.warns(UserWarning, match="threaded kernels unavailable"):
        broken = kernels.moments(x, 2)
    assert kernels._Parallel.off
    assert np.array_equal(broken[0], serial[0]) and np.array_equal(broken[1], serial[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.moments(x, 2)  # no second warning: the threaded path stays off


def test_non_finite_input_gives_non_finite_moments():
    for bad in (float("nan"), float("inf"), -float("inf")):
        for shape in [(4, 3, 20, 20), (4, 3, 2, 2)]:
            x = torch.randn(shape)
            x[1, 2, 0, 1] = bad
            _, mean, m2 = batch_moments(x, 1)
            assert torch.isfinite(mean[:2]).all() and torch.isfinite(m2[:2]).all()
            assert not (torch.isfinite(mean[2]) and torch.isfinite(m2[2]))


def test_disabled_kernels_fall_back_to_torch(monkeypatch):
    x = torch.randn(8, 5, 9, 9)
    _, k_mean, k_m2 = batch_moments(x, 1)
    monkeypatch.setenv("BNFOLD_NO_JIT", "1")
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_kernels", None)
    assert not kernels.available()
    _, t_mean, t_m2 = batch_moments(x, 1)
    assert rel(t_m2.numpy(), k_m2.numpy()) <= 1e-12
    assert rel(t_mean.numpy(), k_mean.numpy()) <= 1e-12
    with pytest.raises(RuntimeError, match="not available"):
        kernels.moments(x.numpy().reshape(8, 5, 81))


def test_a_kernel_failure_falls_back_to_torch_with_one_warning(monkeypatch):
    x = torch.randn(4, 3, 5, 5)
    expected = torch_moments(x, 1)

    def broken(*_args):
        raise RuntimeError("LLVM could not compile")

    monkeypatch.setattr(kernels, "moments", broken)
    monkeypatch.setattr(kernels, "_kernels", kernels._kernels)
    monkeypatch.setattr(kernels, "_loaded", kernels._loaded)
    with pytest.warns(UserWarning, match="numba kernels disabled"):
        n, mean, m2 = batch_moments(x, 1)
    assert n == 100 and not kernels.available()
    torch.testing.assert_close(mean, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(m2, expected[1], rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_moments(x, 1)  # no second warning: the kernels stay off


@pytest.mark.parametrize(
    "shape", [(32, 40, 16), (19, 8, 4), (3, 8, 4), (8, 16, 33), (64, 5, 1), (1, 6, 70)]
)
def test_row_and_column_loops_agree(shape):
    # the loop shape is a matter of speed (kernels._rows): both reduce every channel in float64
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 5).numpy()
    mean, m2 = fsum_moments(torch.from_numpy(x), 1)
    for loop in (_jit.row_moments, _jit.plane_moments):
        got_mean, got_m2 = np.empty(shape[1]), np.empty(shape[1])
        loop(x, 0, shape[1], got_mean, got_m2)
        assert rel(got_mean, mean) <= 1e-13
        assert rel(got_m2, m2) <= 1e-13
