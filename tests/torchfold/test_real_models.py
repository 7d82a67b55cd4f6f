"""Real timm and torchvision networks fold every BN an exact fold can remove, and stay exact.

Each network is built with random weights and randomised BN statistics. The number folded is
checked against an independent count taken from a real forward (:mod:`realnets`), the output
against the model run in float64 (the fold may add no more than a small factor of the
unfolded float32 model's own error), and every BN-like layer must have a decision under its
module path. Default tests use a few small networks at 32x32-64x64; the families of the issue
run under ``-m slow`` (the ``quick`` ones in CI).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from realnets import backward_foldable, bn_like_paths, float64_error, randomise_bn_like
from torch import nn

from bnfold.sites import SkipCode
from bnfold.torchfold import count_batchnorms, fold_torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import BatchNormAct2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402


def _check(model: nn.Module, x: torch.Tensor, *, kept: int = 0) -> tuple[nn.Module, object]:
    """Fold ``model`` and check the count, the decisions' names, and the float64 error."""
    model = randomise_bn_like(model)
    expected = backward_foldable(model, x)
    folded, report = fold_torch(model, x)
    paths = bn_like_paths(model)
    assert sorted(d.bn for d in report.decisions) == sorted(paths)
    assert {d.bn for d in report.folded} >= expected
    assert len(report.folded) == len(paths) - kept, [(d.bn, d.reason) for d in report.skipped]
    assert count_batchnorms(folded) == kept
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 2e-7, (own, err)
    assert type(folded) is type(model)
    return folded, report


def test_quick_timm_batchnormact_mobilenetv3_folds_keeps_its_activations() -> None:
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    act = type(model.bn1.act)
    folded, _ = _check(model, torch.randn(2, 3, 64, 64))
    assert type(folded.bn1) is act  # BN part folded, the activation stays at the same path


def test_timm_same_padding_convs_take_the_bn_after_them() -> None:
    """timm's ``tf_*`` models use ``Conv2dSame`` (zero padding computed from the input size):
    every BN after one folds, and the folded model stays exact at other input sizes, where
    the padding differs."""
    model = timm.create_model("tf_mobilenetv3_small_075", pretrained=False)
    folded, report = _check(model, torch.randn(2, 3, 64, 64))
    assert report.decisions[0].target == "conv_stem"
    own, err = float64_error(model, folded, torch.randn(1, 3, 61, 67))
    assert err <= 4 * own + 2e-7, (own, err)


def test_a_bn_before_a_same_padding_conv_folds_forward_only_without_padding() -> None:
    from timm.layers import Conv2dSame

    x = torch.randn(2, 3, 9, 9)
    for kernel, folds in ((3, False), (1, True)):
        model = randomise_bn_like(nn.Sequential(nn.BatchNorm2d(3), Conv2dSame(3, 4, kernel, 2)))
        folded, report = fold_torch(model, x, direction="forward")
        assert report.decisions[0].folded is folds, report.decisions[0].reason
        if not folds:
            assert "pads with zeros" in report.decisions[0].reason
        own, err = float64_error(model, folded, x)
        assert err <= 4 * own + 2e-7, (own, err)


def test_timm_frozen_batchnorm_resnet_folds() -> None:
    from timm.utils.model import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(timm.create_model("resnet18", pretrained=False))
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    _check(model, torch.randn(1, 3, 32, 32))


def test_torchvision_frozen_batchnorm_resnet_folds() -> None:
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    _check(model, torch.randn(1, 3, 32, 32))


# BN+act layers, one idea per test -----------------------------------------------------------


class ConvBnAct(nn.Module):
    def __init__(self, bn: nn.Module, then: nn.Module | None = None) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), bn
        self.then = then or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.bn(self.conv(x)))


X = (2, 3, 8, 8)


def test_batchnormact_keeps_an_activation_with_parameters_under_its_state_dict_name() -> None:
    model = randomise_bn_like(ConvBnAct(BatchNormAct2d(6, act_layer=nn.PReLU)))
    x = torch.randn(X)
    folded, report = fold_torch(model, x)
    assert report.decisions[0].folded
    assert "bn.act.weight" in folded.state_dict()
    assert not any(k.startswith("bn.running") for k in folded.state_dict())
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 2e-7


def test_batchnormact_with_an_activation_does_not_fold_forward() -> None:
    model = nn.Sequential(BatchNormAct2d(3), nn.Conv2d(3, 4, 1))
    randomise_bn_like(model)
    _folded, report = fold_torch(model, torch.randn(X))
    (d,) = report.decisions
    assert not d.folded and d.code is SkipCode.UNSUPPORTED and "act" in (d.reason or "")


def test_batchnormact_without_activation_folds_forward() -> None:
    model = randomise_bn_like(nn.Sequential(BatchNormAct2d(3, apply_act=False), nn.Conv2d(3, 4, 1)))
    x = torch.randn(X)
    folded, report = fold_torch(model, x)
    assert report.folded[0].direction.value == "forward"
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 2e-7


class OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_bn_subclass_with_its_own_forward_is_refused_with_a_reason() -> None:
    model = randomise_bn_like(ConvBnAct(OwnForwardBN(6)))
    _folded, report = fold_torch(model, torch.randn(X))
    (d,) = report.decisions
    assert d.bn == "bn" and d.code is SkipCode.UNSUPPORTED and "overrides forward" in d.reason


def test_split_batchnorm_folds_its_primary_bn_in_eval_and_not_in_training() -> None:
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = randomise_bn_like(ConvBnAct(SplitBatchNorm2d(6, num_splits=2)))
    x = torch.randn(X)
    folded, report = fold_torch(model, x)
    assert [d.bn for d in report.decisions] == ["bn"] and report.decisions[0].folded
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 2e-7
    _f, train_report = fold_torch(model.train(), x)
    assert train_report.decisions[0].code is SkipCode.TRAINING_MODE


# names and result types ---------------------------------------------------------------------


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.frozen = ConvBnAct(FrozenBatchNorm2d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = self.block(x)[:, :3]
        return self.frozen(x)


def test_export_captured_model_names_bns_by_module_path_and_reports_every_bn_like() -> None:
    model = randomise_bn_like(Branchy())
    x = torch.randn(X)
    folded, report = fold_torch(model, x)
    names = {d.bn: d for d in report.decisions}
    assert set(names) == {"block.1", "frozen.bn"}
    assert names["block.1"].folded
    # torch.export traced into FrozenBatchNorm2d: kept, but under its path and with a reason
    assert not names["frozen.bn"].folded and "torch.export" in (names["frozen.bn"].reason or "")
    # every fold was module surgery: the user's class comes back, for every input shape
    assert type(folded) is Branchy and list(folded.block._modules) == ["0"]
    assert "torch.export" in (report.result or "") and report.to_dict()["result"] == report.result
    for shape in (X, (1, 3, 12, 9)):
        y = torch.randn(shape)
        assert torch.allclose(folded(y), model(y), atol=1e-5)


class FunctionalBranchy(Branchy):
    """A functional batch norm on a module's buffers: only the traced graph can hold its fold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            bn = self.block[1]
            x = F.batch_norm(self.block[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias)
        return x


def test_export_captured_functional_bn_comes_back_as_a_graph_named_by_path() -> None:
    model = randomise_bn_like(FunctionalBranchy())
    x = torch.randn(X)
    folded, report = fold_torch(model, x)
    assert isinstance(folded, torch.fx.GraphModule) and "GraphModule" in (report.result or "")
    assert [d.bn for d in report.folded] == ["block.1"]
    assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_module_result_is_stated_in_the_report() -> None:
    _folded, report = fold_torch(randomise_bn_like(ConvBnAct(nn.BatchNorm2d(6))), torch.randn(X))
    assert (report.result or "").startswith("ConvBnAct, the given model's own class")


# partial capture ----------------------------------------------------------------------------


class Untraceable(nn.Module):
    """Neither tracer takes it whole (a list input, a data-dependent Python branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for image in images:
            y = self.head(self.stem(image[None]))
            if float(y.mean()) > 1e9:  # data-dependent
                y = y * 2
            out.append(self.bn(y))
        return out


def test_uncapturable_model_gets_its_capturable_parts_folded() -> None:
    model = randomise_bn_like(Untraceable())
    images = [torch.randn(3, 8, 8), torch.randn(3, 6, 10)]
    folded, report = fold_torch(model, (images,))
    assert type(folded) is Untraceable
    by_name = {d.bn: d for d in report.decisions}
    assert by_name["stem.1"].folded and by_name["head.1"].folded
    assert by_name["head.1"].params.keys() == {"head.0.weight", "head.0.bias"}
    assert not by_name["bn"].folded and "cannot be captured" in (by_name["bn"].reason or "")
    parts = {p["path"]: p["status"] for p in report.parts}
    assert parts == {"": "left", "stem": "folded", "head": "folded"}
    assert count_batchnorms(folded) == 1
    with torch.no_grad():
        for a, b in zip(model(images), folded(images), strict=True):
            assert torch.allclose(a, b, atol=1e-5)  # another image size than recorded, too


def test_partial_capture_leaves_the_users_model_untouched() -> None:
    model = randomise_bn_like(Untraceable())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_torch(model, ([torch.randn(3, 8, 8)],))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.stem[1], nn.BatchNorm2d)


# the families of the issue, slow ------------------------------------------------------------


def _detection_parts_close(model: nn.Module, folded: nn.Module, images: list[torch.Tensor]) -> None:
    """Backbone features and head outputs, which (unlike boxes after NMS) vary smoothly."""
    with torch.no_grad():
        batch, _ = model.transform(images)
        ref = model.backbone(batch.tensors)
        out = folded.backbone(batch.tensors)
        for k in ref:
            scale = ref[k].abs().max()
            assert float((ref[k] - out[k]).abs().max() / scale) <= 1e-5, k
        if hasattr(model, "head"):
            feats = list(ref.values())
            a, b = model.head(feats), folded.head(list(out.values()))
            for k in a:
                assert float((a[k] - b[k]).abs().max() / a[k].abs().max()) <= 1e-4, k


@pytest.mark.slow
def test_quick_ssdlite_folds_backbone_and_heads() -> None:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = randomise_bn_like(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None))
    images = [torch.rand(3, 96, 128)]
    folded, report = fold_torch(model, (images,))
    paths = bn_like_paths(model)
    assert sorted(d.bn for d in report.decisions) == sorted(paths)
    assert len(report.folded) == len(paths) and count_batchnorms(folded) == 0
    assert any(p["path"] == "" and p["status"] == "left" for p in report.parts)
    _detection_parts_close(model, folded, images)


@pytest.mark.slow
def test_fasterrcnn_with_frozen_batchnorm_folds_its_backbone() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, min_size=96, max_size=128)
    model = randomise_bn_like(model)
    images = [torch.rand(3, 96, 128)]
    batch, _ = model.transform(images)
    expected = backward_foldable(model.backbone, batch.tensors)
    folded, report = fold_torch(model, (images,))
    assert {d.bn for d in report.folded} == {f"backbone.{p}" for p in expected}
    assert len(report.decisions) == len(bn_like_paths(model)) == 53
    assert count_batchnorms(folded) == 0
    _detection_parts_close(model, folded, images)


@pytest.mark.slow
def test_ssd_vgg_has_nothing_to_fold_and_does_not_crash() -> None:
    from torchvision.models.detection import ssd300_vgg16

    model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    folded, report = fold_torch(model, ([torch.rand(3, 64, 64)],))
    assert report.decisions == [] and type(folded) is type(model)


TIMM_FAMILIES = [
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "regnety_002",
    "cspresnet50",
    "ese_vovnet19b_dw",
    "mixnet_s",
    "tinynet_e",
    "lcnet_050",
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "dpn68",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_family_folds_every_backward_foldable_bn(name: str) -> None:
    model = randomise_bn_like(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    expected = backward_foldable(model, x)
    folded, report = fold_torch(model, x)
    assert sorted(d.bn for d in report.decisions) == sorted(bn_like_paths(model))
    assert {d.bn for d in report.folded} >= expected
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 1e-6, (own, err)


@pytest.mark.slow
def test_densenet_keeps_bn_relu_conv_with_reasons() -> None:
    model = randomise_bn_like(torchvision.models.densenet121(weights=None))
    x = torch.randn(1, 3, 32, 32)
    expected = backward_foldable(model, x)
    folded, report = fold_torch(model, x)
    assert {d.bn for d in report.folded} == expected
    assert all(d.code is not None and d.reason for d in report.skipped)
    own, err = float64_error(model, folded, x)
    assert err <= 4 * own + 1e-6


def test_frozen_and_sync_batchnormact_fold_and_keep_their_activation() -> None:
    from timm.layers import convert_sync_batchnorm
    from timm.layers.norm_act import FrozenBatchNormAct2d, SyncBatchNormAct

    x = torch.randn(X)
    frozen = randomise_bn_like(ConvBnAct(FrozenBatchNormAct2d(6, act_layer=nn.SiLU)))
    synced = randomise_bn_like(convert_sync_batchnorm(ConvBnAct(BatchNormAct2d(6))))
    assert isinstance(synced.bn, SyncBatchNormAct)
    for model, act in ((frozen, nn.SiLU), (synced, nn.ReLU)):
        folded, report = fold_torch(model, x)
        assert report.decisions[0].folded and type(folded.bn) is act
        own, err = float64_error(model, folded, x)
        assert err <= 4 * own + 2e-7, (type(model.bn).__name__, own, err)
    frozen.train()  # a frozen layer never normalises with batch statistics
    assert fold_torch(frozen, x)[1].decisions[0].folded


class DataDependent(nn.Module):
    """Neither torch.fx nor torch.export captures it whole (an output size read from data)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        n = int((y > 0).sum())
        return y[:, :, :1].repeat(1, 1, max(n % 3, 1), 1)


def test_a_failed_export_attempt_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """torch.export prints its partial graph to stderr when it fails (450 KB on SSDlite);
    bnfold falls back to partial capture and reports the error, so nothing is printed."""
    model = randomise_bn_like(DataDependent()).eval()
    x = torch.randn(1, 3, 8, 8)
    folded, report = fold_torch(model, (x,))
    assert [d.folded for d in report.decisions] == [True]
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)
    err = capfd.readouterr().err
    assert "def forward" not in err and len(err) < 200, err[:300]
