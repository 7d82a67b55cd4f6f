"""Every case of the issue's *Why* list: bnfold folds it exactly or keeps the BN with a reason.

Each case is a model on which a peer (fx ``fuse``, ``fuse_fx``, ``jit.freeze``, inductor
freezing) produces a wrong model. bnfold must either fold exactly (relative error <= 1e-5 in
fp32, no BN left) or skip with a reason and leave the outputs unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchfold_util import randomise, rel_err

from bnfold import SkipCode
from bnfold.torchfold import count_batchnorms, fold_torch


def _fold(model: nn.Module, x: torch.Tensor, **kw):
    ref = model(x)
    folded, report = fold_torch(model, x, **kw)
    return folded, report, ref, folded(x)


# Linear on a 3-D input, then BatchNorm1d with C == out_features -------------------------------


class Linear3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))  # (N, 8, 6) -> (N, 8, 8): BN normalises dim 1, not features


def test_linear_3d_then_bn1d_same_size_is_skipped_for_channel_axis() -> None:
    model = randomise(Linear3d())
    x = torch.randn(4, 8, 6)
    folded, report, ref, out = _fold(model, x)
    (d,) = report.decisions
    assert not d.folded and d.code is SkipCode.CHANNEL_AXIS
    assert "axis 1" in (d.reason or "") and "axis 2" in (d.reason or "")
    assert torch.equal(ref, out)
    assert count_batchnorms(folded) == 1


def test_linear_3d_then_bn1d_without_shapes_is_not_guessed() -> None:
    model = randomise(Linear3d())
    x = torch.randn(4, 8, 6)
    folded, report = fold_torch(model)
    (d,) = report.decisions
    assert d.code is SkipCode.UNKNOWN_SHAPE
    assert torch.equal(model(x), folded(x))


def test_linear_2d_then_bn1d_folds_exactly() -> None:
    model = randomise(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)))
    folded, report, ref, out = _fold(model, torch.randn(5, 6))
    assert report.decisions[0].folded and count_batchnorms(folded) == 0
    assert rel_err(ref, out) <= 1e-5


# ConvTranspose with C_in == C_out, and with groups > 1 ---------------------------------------


@pytest.mark.parametrize(
    ("cls", "bn", "shape"),
    [
        (nn.ConvTranspose1d, nn.BatchNorm1d, (2, 8, 9)),
        (nn.ConvTranspose2d, nn.BatchNorm2d, (2, 8, 7, 6)),
        (nn.ConvTranspose3d, nn.BatchNorm3d, (1, 8, 4, 5, 3)),
    ],
)
@pytest.mark.parametrize(("cout", "groups"), [(8, 1), (8, 2), (12, 4), (8, 8)])
def test_conv_transpose_any_groups_folds_on_the_output_axis(cls, bn, shape, cout, groups) -> None:
    model = randomise(nn.Sequential(cls(8, cout, 3, stride=2, groups=groups, bias=False), bn(cout)))
    folded, report, ref, out = _fold(model, torch.randn(shape))
    assert report.decisions[0].folded, report.decisions[0].reason
    assert count_batchnorms(folded) == 0
    assert rel_err(ref, out) <= 1e-5


# A conv called at two sites, or a producer whose output has a second user -------------------


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


class SecondUser(nn.Module):
    def __init__(self, linear: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4) if linear else nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm1d(4) if linear else nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return self.bn(y) * torch.sigmoid(y)


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


def test_conv_module_called_twice_is_not_folded_for_one_site() -> None:
    model = randomise(SharedConv())
    _folded, report, ref, out = _fold(model, torch.randn(2, 4, 6, 6))
    (d,) = report.decisions
    assert d.code is SkipCode.SHARED_MODULE and "conv" in (d.reason or "")
    assert torch.equal(ref, out)


def test_tied_parameter_is_not_edited() -> None:
    model = randomise(TiedWeights())
    _folded, report, ref, out = _fold(model, torch.randn(3, 4))
    assert report.decisions[0].code is SkipCode.SHARED_MODULE
    assert torch.equal(ref, out)


@pytest.mark.parametrize("linear", [True, False])
def test_producer_output_with_second_user_is_skipped(linear: bool) -> None:
    model = randomise(SecondUser(linear))
    x = torch.randn(3, 4) if linear else torch.randn(2, 4, 5, 5)
    _folded, report, ref, out = _fold(model, x)
    (d,) = report.decisions
    assert d.code is SkipCode.MULTIPLE_USERS and "sigmoid" in (d.reason or "")
    assert torch.equal(ref, out)


def test_producer_output_that_is_a_model_output_is_skipped() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return y, self.bn(y)

    model = randomise(Both())
    x = torch.randn(1, 3, 4, 4)
    folded, report = fold_torch(model, x)
    assert report.decisions[0].code is SkipCode.GRAPH_OUTPUT
    for a, b in zip(model(x), folded(x), strict=True):
        assert torch.equal(a, b)


# Functional F.batch_norm, forward folds, affine=False ---------------------------------------


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.gamma = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_functional_batch_norm_folds() -> None:
    model = Functional().eval()
    folded, report, ref, out = _fold(model, torch.randn(2, 3, 8, 8))
    (d,) = report.decisions
    assert d.folded and d.target == "conv"
    assert isinstance(folded, torch.fx.GraphModule) and count_batchnorms(folded) == 0
    assert rel_err(ref, out) <= 1e-5
    assert sorted(d.params["conv.bias"]) == sorted(["conv.bias", "mean", "var", "gamma", "beta"])


def test_functional_batch_norm_in_training_mode_is_kept() -> None:
    class Train(Functional):
        def forward(self, x):
            y = self.conv(x)
            return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, True, 0.0, 1e-3)

    model = Train().eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_torch(model, x)
    assert report.decisions[0].code is SkipCode.TRAINING_MODE
    assert torch.equal(model(x), folded(x))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_forward_fold_into_padded_conv_with_non_zero_padding_mode(mode: str) -> None:
    model = randomise(
        nn.Sequential(
            nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=2, padding_mode=mode)
        )
    )
    folded, report, ref, out = _fold(model, torch.randn(2, 4, 7, 7))
    d = report.decisions[0]
    assert d.folded and d.direction.value == "forward"
    assert count_batchnorms(folded) == 0 and rel_err(ref, out) <= 1e-5


def test_forward_fold_into_zero_padded_conv_is_skipped() -> None:
    model = randomise(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    _folded, report, ref, out = _fold(model, torch.randn(2, 4, 7, 7))
    assert report.decisions[0].code is SkipCode.PADDING
    assert torch.equal(ref, out)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_forward_fold_into_unpadded_grouped_conv(groups: int) -> None:
    model = randomise(
        nn.Sequential(nn.Tanh(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, stride=2, groups=groups))
    )
    _folded, report, ref, out = _fold(model, torch.randn(2, 4, 9, 9))
    assert report.decisions[0].folded and rel_err(ref, out) <= 1e-5


@pytest.mark.parametrize("flatten", ["module", "function", "method"])
def test_forward_fold_through_flatten_into_linear(flatten: str) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.flat, self.fc = nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 5, 7)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            if flatten == "module":
                y = self.flat(y)
            elif flatten == "function":
                y = torch.flatten(y, 1)
            else:
                y = y.flatten(1)
            return self.fc(y)

    _folded, report, ref, out = _fold(randomise(Head()), torch.randn(2, 3, 4, 5))
    d = report.decisions[0]
    assert d.folded and d.target == "fc" and rel_err(ref, out) <= 1e-5


def test_bn_into_following_linear_and_affine_false() -> None:
    model = randomise(
        nn.Sequential(
            nn.Linear(5, 6),
            nn.BatchNorm1d(6, affine=False),
            nn.ReLU(),
            nn.BatchNorm1d(6, affine=False),
            nn.Linear(6, 3),
        )
    )
    folded, report, ref, out = _fold(model, torch.randn(4, 5))
    assert [d.direction.value for d in report.decisions] == ["backward", "forward"]
    assert count_batchnorms(folded) == 0 and rel_err(ref, out) <= 1e-5
    # both BNs are deleted from the Sequential (no Identity call left); the others keep their keys
    assert type(folded) is nn.Sequential and list(folded._modules) == ["0", "2", "4"]
