"""Folds through an operation between BN and layer, against a float64 run of the original.

Conv -> ``+ param`` -> BN (a bias kept outside the layer), MixConv's channel ``cat`` -> BN,
LeViT's LinearNorm (Linear -> ``flatten(0, 1)`` -> BatchNorm1d -> ``reshape_as``), and
classifier heads (BN -> average pool -> flatten -> Linear); and their near misses, which keep
the BN with a reason naming what blocked each direction.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchfold_util import randomise, rel_err

import bnfold
from bnfold import SkipCode
from bnfold.models.patterns import LinearNorm
from bnfold.sites import Direction
from bnfold.torchfold import count_batchnorms

X4 = (2, 4, 8, 8)


def _fold64(model: nn.Module, x: torch.Tensor, *, program: bool = False, tol: float = 1e-5):
    """Fold (an nn.Module or its ExportedProgram); compare with the float64 original."""
    model = randomise(model)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        before = copy.deepcopy(model.state_dict())
        given = torch.export.export(model, (x,)) if program else model
        folded, report = bnfold.fold(given, x)
        run = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        out = run(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert rel_err(ref, out) <= tol, rel_err(ref, out)
    return folded, report


def _kept(model: nn.Module, x: torch.Tensor, code: SkipCode, example: bool = True):
    model = randomise(model)
    with torch.no_grad():
        ref = model(x)
        folded, report = bnfold.fold(model, x if example else None)
        assert rel_err(ref, folded(x)) <= 1e-6
    kept = [d for d in report.decisions if not d.folded]
    assert len(kept) == 1 and kept[0].code is code, [(d.code, d.reason) for d in kept]
    reason = kept[0].reason or ""
    assert reason.startswith("backward: ") and "; forward: " in reason, reason
    return kept[0]


# ---- conv -> + constant -> BN --------------------------------------------------------------


class ConvAddBN(nn.Module):
    def __init__(self, shape: tuple[int, ...] = (1, 6, 1, 1), form: str = "param") -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, bias=False)
        self.form = form
        if form == "buffer":
            self.register_buffer("shift", torch.randn(shape))
        else:
            self.shift = nn.Parameter(torch.randn(shape))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = self.shift.view(1, -1, 1, 1) if self.form == "view" else self.shift
        return self.bn(self.conv(x) + shift)


@pytest.mark.parametrize(
    ("shape", "form"),
    [((1, 6, 1, 1), "param"), ((6, 1, 1), "buffer"), ((6,), "view"), ((1,), "param")],
)
def test_conv_add_constant_bn_folds_and_keeps_the_add(shape, form) -> None:
    folded, report = _fold64(ConvAddBN(shape, form), torch.randn(X4))
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.BACKWARD and d.target == "conv"
    assert isinstance(folded, ConvAddBN) and isinstance(folded.bn, nn.Identity)
    assert "shift" in d.params["conv.bias"]


def test_conv_add_constant_bn_in_an_exported_program() -> None:
    folded, report = _fold64(ConvAddBN(), torch.randn(X4), program=True)
    assert isinstance(folded, torch.export.ExportedProgram) and count_batchnorms(folded) == 0
    assert report.decisions[0].folded


def test_conv_add_of_a_spatially_varying_constant_is_kept() -> None:
    d = _kept(ConvAddBN((1, 6, 6, 6)), torch.randn(X4), SkipCode.UNSUPPORTED)
    assert "not a bias" in (d.reason or "")


# ---- cat -> BN -----------------------------------------------------------------------------


class MixConv(nn.Module):
    """timm's MixedConv2d: split the channels, one kernel size per group, cat, one BN."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [2, 1, 1]
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(2, 3, 3, padding=1),
                nn.Conv2d(1, 2, 5, padding=2, bias=False),
                nn.Conv2d(1, 4, 7, padding=3),
            ]
        )
        self.bn = nn.BatchNorm2d(9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)  # indexed as timm does, which fx can trace
        return F.relu(self.bn(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1)))


@pytest.mark.parametrize("program", [False, True], ids=["module", "exported"])
def test_mixconv_cat_splits_the_bn(program) -> None:
    folded, report = _fold64(MixConv(), torch.randn(X4), program=program)
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.BACKWARD
    if not program:
        assert d.target == "convs.0, convs.1, convs.2"
        assert isinstance(folded, MixConv) and count_batchnorms(folded) == 0


class DenseCat(nn.Module):
    """DenseNet: a feature map is concatenated and also read by a later layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 1)
        self.bn = nn.BatchNorm2d(5)
        self.c = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return F.relu(self.bn(torch.cat([a, self.b(x)], 1))) + self.c(a)


def test_cat_input_with_a_second_user_is_kept() -> None:
    d = _kept(DenseCat(), torch.randn(X4), SkipCode.MULTIPLE_USERS)
    assert "cat" in (d.reason or "") and "relu" in (d.reason or "")


class SpatialCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(torch.cat([self.a(x), self.b(x)], 2)))


def test_cat_along_a_spatial_dim_is_kept() -> None:
    d = _kept(SpatialCat(), torch.randn(X4), SkipCode.NO_PARTNER)
    assert "dim 2" in (d.reason or "") and "sigmoid" in (d.reason or "")


# ---- Linear -> flatten -> BatchNorm1d -> reshape -------------------------------------------


class Levitish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = LinearNorm(4, 6)
        self.proj = LinearNorm(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.hardswish(self.qkv(x)))


@pytest.mark.parametrize("program", [False, True], ids=["module", "exported"])
def test_linear_norm_folds_through_the_flatten(program) -> None:
    folded, report = _fold64(Levitish(), torch.randn(2, 5, 4), program=program)
    assert [d.folded for d in report.decisions] == [True, True]
    if not program:
        assert [d.target for d in report.decisions] == ["qkv.linear", "proj.linear"]
        assert isinstance(folded, Levitish)


def test_linear_norm_without_example_inputs_is_unknown_shape() -> None:
    model = randomise(LinearNorm())
    _folded, report = bnfold.fold(model)
    (d,) = report.decisions
    assert d.code is SkipCode.UNKNOWN_SHAPE


class MovedChannels(nn.Module):
    """(B, N, 6) -> (B*N*2, 3): BN channel k mixes two Linear outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.tanh(self.bn(y.reshape(-1, 3)).reshape_as(y))


def test_reshape_that_moves_the_channel_axis_is_kept() -> None:
    d = _kept(MovedChannels(), torch.randn(2, 5, 4), SkipCode.CHANNEL_AXIS)
    assert "moves" in (d.reason or "")


# ---- BN -> average pool -> flatten -> Linear -----------------------------------------------


class Head(nn.Module):
    """ConvMixer's head: BN after the activation, global pooling, flatten, classifier."""

    def __init__(self, pool: str = "adaptive") -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.kind = pool
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else nn.AvgPool2d(2)
        self.padded = nn.AvgPool2d(3, stride=2, padding=1)
        self.flatten = nn.Flatten(1)
        features = {"avgpool": 6 * 9, "padded": 6 * 9}.get(pool, 6)
        self.fc = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(F.gelu(self.conv(x)))
        if self.kind == "functional":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
        if self.kind == "mean":
            return self.fc(y.mean((2, 3)))
        if self.kind == "padded":
            return self.fc(self.flatten(self.padded(y)))
        return self.fc(self.flatten(self.pool(y)))


@pytest.mark.parametrize("pool", ["adaptive", "avgpool", "functional", "mean"])
def test_bn_pool_flatten_linear_folds_forward(pool) -> None:
    x = torch.randn(2, 4, 8, 8)
    if pool == "avgpool":
        x = torch.randn(2, 4, 8, 8)  # 6x6 after the conv, 3x3 after the pool
    folded, report = _fold64(Head(pool), x)
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.FORWARD and d.target == "fc"
    assert isinstance(folded, Head)


def test_bn_pool_head_in_an_exported_program() -> None:
    folded, report = _fold64(Head(), torch.randn(2, 4, 8, 8), program=True)
    assert report.decisions[0].folded and count_batchnorms(folded) == 0


def test_padded_pool_is_kept() -> None:
    d = _kept(Head("padded"), torch.randn(2, 4, 8, 8), SkipCode.PADDING)
    assert "pads" in (d.reason or "") and "gelu" in (d.reason or "")


# ---- reasons -------------------------------------------------------------------------------


class Between(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(torch.relu(x)))


def test_kept_bn_names_the_node_on_each_side() -> None:
    d = _kept(Between(), torch.randn(X4), SkipCode.NO_PARTNER)
    assert d.reason == (
        "backward: no foldable producer (Conv, ConvTranspose, Linear/Gemm, MatMul): the input "
        "comes from relu; forward: no foldable consumer (Conv, ConvTranspose, Linear/Gemm, "
        "MatMul): the output is read by sigmoid"
    )


def test_mixconv_without_example_inputs_uses_the_layers_channel_counts() -> None:
    """No recorded shapes: each cat input's share is its conv's output channels."""
    model = randomise(MixConv())
    x = torch.randn(X4)
    with torch.no_grad():
        ref = model(x)
        folded, report = bnfold.fold(model)
        assert rel_err(ref, folded(x)) <= 1e-5
    assert report.decisions[0].folded


class CatChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(5), nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.bn1(torch.cat([self.a(x), self.b(x)], 1))))


def test_cat_bn_bn_chain_folds_both() -> None:
    folded, report = _fold64(CatChain(), torch.randn(X4))
    assert [d.target for d in report.decisions] == ["a, b", "a, b"]
    assert isinstance(folded, CatChain) and count_batchnorms(folded) == 0


class NormLinear(nn.Module):
    """timm's NormLinear head: BN1d, an eval-mode dropout, Linear."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(p)
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(torch.relu(x))))


def test_bn_through_eval_dropout_into_linear_folds_forward() -> None:
    _folded, report = _fold64(NormLinear(0.3), torch.randn(4, 6))
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.FORWARD and d.target == "linear"


def test_bn_through_train_mode_dropout_is_kept() -> None:
    model = randomise(NormLinear(0.3))
    model.drop.train()
    _folded, report = bnfold.fold(model, torch.randn(4, 6))
    assert not report.decisions[0].folded


class DropHead(nn.Module):
    """timm ConvMixer's head: pool, flatten, an eval-mode dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.flatten(self.pool(self.bn(F.gelu(self.conv(x)))))
        return self.head(self.drop(y))


def test_pool_flatten_dropout_linear_folds_forward() -> None:
    _folded, report = _fold64(DropHead(), torch.randn(2, 4, 8, 8))
    (d,) = report.decisions
    assert d.folded and d.direction is Direction.FORWARD and d.target == "head"
