"""Data built to defeat per-batch averaging, and a float64 whole-data oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _oracle(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance of all values per channel, in float64 (two-pass)."""
    x64 = np.moveaxis(np.asarray(x, dtype=np.float64), channel_axis, 0).reshape(x.shape[1], -1)
    mean = x64.mean(axis=1)
    var = ((x64 - mean[:, None]) ** 2).sum(axis=1) / (x64.shape[1] - 1)
    return mean, var


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.fixture(scope="session")
def correlated_images() -> torch.Tensor:
    """Images whose pixels share a per-image offset: within-batch spread is small, so the
    mean of batch variances misses most of the variance. Channel 2 has mean ~100, which
    defeats E[x^2] - E[x]^2 in float32."""
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 96, 3, 8, 8
    offset = torch.randn(n, c, 1, 1, generator=g) * 3.0
    noise = torch.randn(n, c, h, w, generator=g) * 0.5
    base = torch.tensor([0.0, -2.0, 100.0]).reshape(1, c, 1, 1)
    return (base + offset + noise).float()


@pytest.fixture(scope="session")
def class_ordered() -> torch.Tensor:
    """Samples sorted by class, each class with its own mean: batches are one class each."""
    g = torch.Generator().manual_seed(2)
    classes, per_class, c = 6, 16, 4
    means = torch.randn(classes, c, generator=g) * 5.0
    x = means.repeat_interleave(per_class, 0) + torch.randn(classes * per_class, c, generator=g)
    return x[:, :, None, None].repeat(1, 1, 3, 3).float() + 0.1 * torch.randn(
        classes * per_class, c, 3, 3, generator=g
    )


@pytest.fixture(scope="session")
def oracle():
    """The float64 whole-data oracle: ``oracle(x, channel_axis=1) -> (mean, unbiased var)``."""
    return _oracle


@pytest.fixture(scope="session")
def rel_err():
    """``rel_err(got, want)``: the largest elementwise relative error."""
    return _rel_err
