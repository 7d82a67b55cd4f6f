"""The accumulator against a float64 whole-data oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnfold.errors import BadInputError
from bnfold.recalib.stats import BatchVarianceMean, ChannelStats, make_accumulator


@pytest.mark.parametrize("data_name", ["correlated_images", "class_ordered"])
@pytest.mark.parametrize("bs", [1, 5, 16, 96])
@pytest.mark.parametrize("shuffle", [False, True])
def test_exact_matches_oracle_any_batching(request, data_name, bs, shuffle, oracle, rel_err):
    x = request.getfixturevalue(data_name)
    if shuffle:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(bs))]
    acc = ChannelStats(x.shape[1])
    for i in range(0, x.shape[0], bs):
        acc.update(x[i : i + bs], 1)
    mean, var = oracle(x.numpy())
    got_mean, got_var = acc.result()
    assert acc.count == x.numel() // x.shape[1]
    assert rel_err(got_mean.numpy(), mean) <= 1e-7
    assert rel_err(got_var.numpy(), var) <= 1e-7


def test_batch_variance_mean_is_the_biased_named_alternative(class_ordered, oracle, rel_err):
    x = class_ordered
    exact, equal = ChannelStats(4), BatchVarianceMean(4)
    for i in range(0, x.shape[0], 16):
        exact.update(x[i : i + 16])
        equal.update(x[i : i + 16])
    _, var = oracle(x.numpy())
    # equal weight per batch drops the spread between class means: far too small
    assert np.all(equal.result()[1].numpy() < 0.5 * var)
    assert rel_err(exact.result()[1].numpy(), var) <= 1e-7
    # it is what update_bn computes: the mean of unbiased per-batch variances
    per_batch = [
        x[i : i + 16].double().transpose(0, 1).reshape(4, -1).var(1) for i in range(0, 96, 16)
    ]
    np.testing.assert_allclose(
        equal.result()[1].numpy(), torch.stack(per_batch).mean(0), rtol=1e-12
    )


def test_large_mean_channel_keeps_precision(oracle, rel_err):
    # values around 1e4 with spread 1e-2: E[x^2]-E[x]^2 in float32 would be pure noise
    g = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(64, 2, 16, generator=g)).float()
    acc = ChannelStats(2)
    for i in range(0, 64, 3):
        acc.update(x[i : i + 3])
    mean, var = oracle(x.numpy())
    assert rel_err(acc.result()[1].numpy(), var) <= 1e-7
    assert rel_err(acc.result()[0].numpy(), mean) <= 1e-12


def test_channel_axis_last_and_2d():
    x = torch.randn(10, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = ChannelStats(7)
    acc.update(x[:4], 1)
    acc.update(x[4:], 1)
    # a mean near zero has no relative precision to speak of: bound it absolutely too
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(0).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(acc.unbiased_var().numpy(), x.var(0).numpy(), rtol=1e-12)
    last = ChannelStats(7)
    last.update(x.reshape(2, 5, 7), -1)
    np.testing.assert_allclose(last.mean.numpy(), x.mean(0).numpy(), rtol=1e-13, atol=1e-15)


def test_merge_of_empty_part_is_a_no_op():
    acc = ChannelStats(3)
    acc.update(torch.ones(2, 3))
    before = acc.state().clone()
    acc.merge_state(ChannelStats(3).state())
    assert torch.equal(before, acc.state())


def test_unknown_estimator_is_bad_input():
    with pytest.raises(BadInputError, match="exact"):
        make_accumulator("ema", 3)
