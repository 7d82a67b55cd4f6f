"""Patterns from real networks: each folds exactly or is kept with a clear reason.

Covers torchvision-style ``forward`` code, squeeze-excitation gates, concatenated BN outputs,
SyncBatchNorm, channels_last, half precision, ``padding='same'``, parametrized weights, BN
without momentum, unusual attribute names, TorchScript submodules, decomposed exported
graphs (``aten.addmm`` / ``aten.mm`` / ``aten.convolution``) and dynamic export shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_dtypes import _assert_nearest
from torch import nn
from torch.nn.utils import parametrizations
from torchfold_util import randomise, rel_err

import bnfold
from bnfold import SkipCode
from bnfold.torchfold import count_batchnorms

X4 = (2, 4, 8, 8)


def _exact(model: nn.Module, x: torch.Tensor, direction: str = "both", tol: float = 1e-5):
    """Fold ``model``; assert the original is untouched and the outputs match."""
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        folded, report = bnfold.fold(model, x, direction=direction)
        out = folded(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert rel_err(ref, out) <= tol
    return folded, report


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, activation calls written in ``forward``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + x, inplace=True)


def test_torchvision_style_block_folds_exactly() -> None:
    folded, report = _exact(randomise(BasicBlock()), torch.randn(X4))
    assert [d.folded for d in report.decisions] == [True, True]
    assert isinstance(folded, BasicBlock) and count_batchnorms(folded) == 0


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return y * gate


def test_se_gate_on_bn_output_folds_backward() -> None:
    _folded, report = _exact(randomise(SqueezeExcite()), torch.randn(X4))
    (d,) = report.decisions
    assert d.folded and d.target == "conv"
    _folded, report = _exact(randomise(SqueezeExcite()), torch.randn(X4), direction="forward")
    assert report.decisions[0].code is SkipCode.DIRECTION_DISABLED


class CatBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=1)
        self.bna, self.bnb, self.bn = nn.BatchNorm2d(3), nn.BatchNorm2d(5), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.bna(self.a(x)), self.bnb(self.b(x))], 1)
        return self.out(self.bn(y))


def test_cat_of_bn_outputs_folds_every_bn() -> None:
    folded, report = _exact(randomise(CatBN()), torch.randn(X4))
    assert {d.bn: d.target for d in report.decisions} == {"bna": "a", "bnb": "b", "bn": "out"}
    assert count_batchnorms(folded) == 0


def test_sync_batchnorm_converted_model_folds_on_cpu() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(randomise(BasicBlock())).eval()
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    folded, report = _exact(model, torch.randn(X4))
    assert all(d.folded for d in report.decisions) and count_batchnorms(folded) == 0


def test_channels_last_model_and_input() -> None:
    model = randomise(BasicBlock()).to(memory_format=torch.channels_last)
    x = torch.randn(X4).to(memory_format=torch.channels_last)
    folded, report = _exact(model, x)
    assert all(d.folded for d in report.decisions)
    assert folded(x).is_contiguous(memory_format=torch.channels_last) == model(x).is_contiguous(
        memory_format=torch.channels_last
    )


class DoubleBN(nn.Module):
    """Conv -> BN -> BN: the second fold into the same conv must still round only once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3)
        self.bn1, self.bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 6)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.bn1(self.conv(x)))
        return self.bn3(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_store_the_float64_fold_rounded_once(dtype: torch.dtype) -> None:
    base = randomise(DoubleBN(), seed=3)
    with torch.no_grad():
        base.conv.weight.mul_(7.3)
    low = copy.deepcopy(base).to(dtype)
    wide = copy.deepcopy(low).double()  # the same values, exactly
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    folded_low, report = bnfold.fold(low, x.to(dtype))
    folded_wide, _ = bnfold.fold(wide, x.double())
    assert len(report.folded) == 3
    for name, p in folded_low.named_parameters():
        assert p.dtype == dtype
        _assert_nearest(p, dict(folded_wide.named_parameters())[name].double())
    ref = wide(x.double())
    err_folded = rel_err(ref, folded_low(x.to(dtype)))
    err_plain = rel_err(ref, low(x.to(dtype)))
    # Rounding the activations of a different graph differs by a few ulps of the dtype; a
    # fold along the wrong axis or with a wrong bias would be off by O(1).
    assert err_folded <= 4 * err_plain + 4 * torch.finfo(dtype).eps


def test_padding_same_folds_backward_and_forward_only_without_zero_padding() -> None:
    x = torch.randn(X4)
    model = randomise(nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4)))
    _folded, report = _exact(model, x)
    assert report.decisions[0].folded
    zero = randomise(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 4, padding="same")))
    _folded, report = _exact(zero, x, direction="forward")
    assert report.decisions[0].code is SkipCode.PADDING
    circular = nn.Conv2d(4, 4, 4, padding="same", padding_mode="circular")
    _folded, report = _exact(randomise(nn.Sequential(nn.BatchNorm2d(4), circular)), x, "forward")
    assert report.decisions[0].folded


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_weight_norm_parametrized_layer_is_skipped_with_reason(direction: str) -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(4, 4, 1))
    layers = [conv, nn.BatchNorm2d(4)] if direction == "backward" else [nn.BatchNorm2d(4), conv]
    model = randomise(nn.Sequential(*layers))
    folded, report = _exact(model, torch.randn(X4), direction=direction)
    (d,) = report.decisions
    assert d.code is SkipCode.UNSUPPORTED and "parametrization" in (d.reason or "")
    assert count_batchnorms(folded) == 1


def test_bn_with_momentum_none_folds() -> None:
    model = randomise(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=None)))
    _folded, report = _exact(model, torch.randn(X4))
    assert report.decisions[0].folded


class OddNames(nn.Module):
    """Functional layers on tensors registered under names that look like other things."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("weight", nn.Parameter(torch.randn(4, 4, 3, 3) / 4))
        self.register_buffer("bias_running_mean", torch.randn(4))
        self.register_buffer("bias_running_var", torch.rand(4) + 0.5)
        self.register_parameter("bn_weight", nn.Parameter(torch.randn(4)))
        self.register_parameter("bias", nn.Parameter(torch.randn(4)))
        self.register_parameter("running_mean", nn.Parameter(torch.randn(3, 4 * 36) / 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, None, 1, 0)
        y = F.batch_norm(
            y, self.bias_running_mean, self.bias_running_var, self.bn_weight, self.bias, False
        )
        return F.linear(y.flatten(1), self.running_mean)


def test_unusually_named_parameters_fold() -> None:
    model = OddNames().eval()
    folded, report = _exact(model, torch.randn(X4))
    assert report.decisions[0].folded and count_batchnorms(folded) == 0
    assert dict(model.named_parameters())["weight"].shape == (4, 4, 3, 3)


class WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.jit.script(
            randomise(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
        )
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.body(x)))


def test_scripted_submodule_bn_is_reported_as_kept() -> None:
    model = randomise(WithScripted())
    _folded, report = _exact(model, torch.randn(X4))
    by_name = {d.bn: d for d in report.decisions}
    assert by_name["bn"].folded
    kept = by_name["body.1"]
    assert kept.code is SkipCode.UNSUPPORTED and "TorchScript" in (kept.reason or "")


class BNTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn(x)


def test_bn_module_called_twice_has_one_decision() -> None:
    _folded, report = _exact(randomise(BNTwice()), torch.randn(X4))
    (d,) = report.decisions
    assert d.bn == "bn" and d.code is SkipCode.SHARED_MODULE


# decomposed exported graphs ------------------------------------------------------------------


def _targets(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _fold_program(program, x, direction):
    folded, report = bnfold.fold(program, direction=direction)
    assert rel_err(program.module()(x), folded.module()(x)) <= 1e-5
    return folded, report


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("bias", [True, False])
def test_decomposed_linear_addmm_and_mm_fold(direction: str, bias: bool) -> None:
    if direction == "backward":
        model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.BatchNorm1d(8), nn.ReLU())
    else:
        model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 8, bias=bias))
    x = torch.randn(5, 6)
    program = torch.export.export(randomise(model), (x,)).run_decompositions()
    assert ("aten.addmm.default" if bias else "aten.mm.default") in _targets(program)
    folded, report = _fold_program(program, x, direction)
    (d,) = report.decisions
    assert d.folded and d.direction.value == direction
    assert count_batchnorms(folded) == 0


def test_decomposed_convolution_folds_both_ways() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
    )
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(randomise(model), (x,)).run_decompositions()
    assert "aten.convolution.default" in _targets(program)
    folded, report = _fold_program(program, x, "both")
    assert [d.direction.value for d in report.decisions] == ["backward", "forward"]
    assert count_batchnorms(folded) == 0


def test_transposed_weight_read_elsewhere_is_not_folded() -> None:
    class TwoReads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 6))
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            wt = self.w.t()
            return self.bn(torch.mm(x, wt)), wt.sum()

    x = torch.randn(5, 6)
    program = torch.export.export(randomise(TwoReads()), (x,)).run_decompositions()
    folded, report = bnfold.fold(program)
    assert not report.decisions[0].folded
    for a, b in zip(program.module()(x), folded.module()(x), strict=True):
        assert torch.equal(a, b)


# dynamic shapes ------------------------------------------------------------------------------


def test_exported_program_keeps_dynamic_dims() -> None:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=4)
    program = torch.export.export(
        model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch, 2: height},)
    )
    folded, report = bnfold.fold(program)
    assert report.decisions[0].folded and count_batchnorms(folded) == 0
    for shape in [(5, 3, 8, 8), (1, 3, 11, 8), (64, 3, 4, 8)]:
        x = torch.randn(shape)
        assert rel_err(model(x), folded.module()(x)) <= 1e-5
    bounds = sorted((int(r.lower), str(r.upper)) for r in folded.range_constraints.values())
    assert bounds == sorted(
        (int(r.lower), str(r.upper)) for r in program.range_constraints.values()
    )
    with pytest.raises(Exception):  # noqa: B017 - the program's own guard
        folded.module()(torch.randn(65, 3, 8, 8))


# call conventions and lazy modules -----------------------------------------------------------


class KeywordCalls(nn.Module):
    """Modules called with ``input=`` rather than positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn2, self.out = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(input=self.conv(input=x))
        return self.out(input=self.bn2(input=torch.relu(y)))


@pytest.mark.parametrize("direction", ["backward", "forward", "both"])
def test_modules_called_with_keyword_input(direction: str) -> None:
    _folded, report = _exact(randomise(KeywordCalls()), torch.randn(X4), direction=direction)
    folded = {d.bn: d.direction.value for d in report.decisions if d.folded}
    assert (
        folded
        == {
            "backward": {"bn": "backward"},
            "forward": {"bn2": "forward"},
            "both": {"bn": "backward", "bn2": "forward"},
        }[direction]
    )


def test_uninitialised_lazy_module_is_bad_input() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d()).eval()
    with pytest.raises(bnfold.BadInputError, match="run the model once"):
        bnfold.fold(model, torch.randn(X4))
    model(torch.randn(X4))  # initialised by the user: folds
    _folded, report = _exact(randomise(model), torch.randn(X4))
    assert report.decisions[0].folded


def test_program_that_cannot_be_exported_again_is_reported(monkeypatch) -> None:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))

    def refuse(*_args, **_kwargs):
        raise RuntimeError("export refused\nsecond line")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(bnfold.UnsupportedModelError, match=r"export refused\); fold the nn.Module"):
        bnfold.fold(program)


class HandWrittenAddmm(nn.Module):
    """``torch.addmm(b, x, w.t())`` / ``x.mm(w.transpose(0, 1))`` written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(3, 8))
        self.bn1, self.bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(torch.relu(self.bn1(torch.addmm(self.b1, x, self.w1.t()))))
        return y.mm(self.w2.transpose(0, 1))


@pytest.mark.parametrize("decompose", [False, True])
def test_hand_written_addmm_and_mm_fold_in_programs(decompose: bool) -> None:
    x = torch.randn(5, 6)
    program = torch.export.export(randomise(HandWrittenAddmm()), (x,))
    program = program.run_decompositions() if decompose else program
    folded, report = _fold_program(program, x, "both")
    assert [d.direction.value for d in report.decisions] == ["backward", "forward"]
    assert count_batchnorms(folded) == 0


class ShapeReaders(nn.Module):
    """Real code reads sizes between layers (``out.size(0)``, ``out.shape``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
        self.bn2, self.fc = nn.BatchNorm1d(6 * 36), nn.Linear(6 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        n, ch, h, w = c.shape
        y = torch.relu(self.bn(c)).reshape(n, ch * h * w)
        z = self.bn2(y)
        return self.fc(z)[:, : z.size(1)] * z.dim()


@pytest.mark.parametrize("direction", ["backward", "forward", "both"])
def test_shape_reads_do_not_block_folds(direction: str) -> None:
    _folded, report = _exact(randomise(ShapeReaders()), torch.randn(X4), direction=direction)
    expected = {"backward": {"bn"}, "forward": {"bn2"}, "both": {"bn", "bn2"}}[direction]
    assert {d.bn for d in report.decisions if d.folded} == expected


def test_shape_reads_do_not_block_folds_in_programs() -> None:
    x = torch.randn(X4)
    program = torch.export.export(randomise(ShapeReaders()), (x,))
    _folded, report = _fold_program(program, x, "both")
    assert all(d.folded for d in report.decisions)
