"""Real-architecture fold benchmark: timm, torchvision and segmentation_models_pytorch.

For every network (random weights, randomised BN-like statistics, nothing downloaded) it
prints: the BN-like layers, how many bnfold folded backward and forward, how many it kept and
why (skip codes), the max error relative to the output scale against the model run in
float64 (beside the unfolded float32 model's own error, the floor), the fold time, and the
folded model's eager CPU latency (1 thread, median of interleaved runs) as a ratio to the
same network with every BN-like layer replaced by what stays of it when folded (``nn.Identity``,
or a timm BN+act layer's activation; deleted from a plain ``nn.Sequential``), and to that
network with a zero bias on every layer the fold gave a bias (the BN-free network as it
would be trained: the bias add is the BN shift a fold must keep).

Detection models are compared on their backbone features (boxes after NMS of random-weight
detectors are not a smooth function of the weights) and are not timed.

Run: ``python bench/real_models.py [--size 64] [--repeats 15] [--models a,b] [--json out.json]``
(``pip install -e '.[test]' segmentation-models-pytorch``; smp models are skipped without it).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.torchfold import fold_torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "torchfold"))
from realnets import bn_like_paths, randomise_bn_like

from bench.common import with_biases_of, without_bn


def _timm(name: str, frozen: bool = False) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False)
        if frozen:
            from timm.utils.model import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        return model

    return make


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return make


def _tv_frozen(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d

        return getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)

    return make


def _tv_seg(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return _Out(
            getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
        )

    return make


class _Out(nn.Module):
    """torchvision segmentation models return a dict; the bench compares its ``out``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _smp(arch: str, encoder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=3)

    return make


def _detection(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        if name == "fasterrcnn_resnet50_fpn(FrozenBN)":
            from torchvision.models.detection import FasterRCNN
            from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
            from torchvision.ops.misc import FrozenBatchNorm2d

            body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
            return FasterRCNN(
                _resnet_fpn_extractor(body, 3), num_classes=91, min_size=128, max_size=160
            )
        return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)

    return make


# name -> (library, factory, input kind)
MODELS: dict[str, tuple[str, Callable[[], nn.Module], str]] = {
    "efficientnet_b0": ("timm", _timm("efficientnet_b0"), "image"),
    "mobilenetv3_large_100": ("timm", _timm("mobilenetv3_large_100"), "image"),
    "mobilenetv4_conv_small": ("timm", _timm("mobilenetv4_conv_small"), "image"),
    "regnety_002": ("timm", _timm("regnety_002"), "image"),
    "cspresnet50": ("timm", _timm("cspresnet50"), "image"),
    "ese_vovnet19b_dw": ("timm", _timm("ese_vovnet19b_dw"), "image"),
    "mixnet_s": ("timm", _timm("mixnet_s"), "image"),
    "tinynet_e": ("timm", _timm("tinynet_e"), "image"),
    "lcnet_050": ("timm", _timm("lcnet_050"), "image"),
    "repvgg_a0": ("timm", _timm("repvgg_a0"), "image"),
    "mobileone_s0": ("timm", _timm("mobileone_s0"), "image"),
    "fastvit_t8": ("timm", _timm("fastvit_t8"), "image"),
    "dpn68": ("timm", _timm("dpn68"), "image"),
    "efficientnet_b0 (frozen)": ("timm", _timm("efficientnet_b0", frozen=True), "image"),
    "resnet18": ("torchvision", _tv("resnet18"), "image"),
    "resnet18 (FrozenBN)": ("torchvision", _tv_frozen("resnet18"), "image"),
    "mobilenet_v3_small": ("torchvision", _tv("mobilenet_v3_small"), "image"),
    "densenet121": ("torchvision", _tv("densenet121"), "image"),
    "shufflenet_v2_x0_5": ("torchvision", _tv("shufflenet_v2_x0_5"), "image"),
    "mnasnet0_5": ("torchvision", _tv("mnasnet0_5"), "image"),
    "regnet_y_400mf": ("torchvision", _tv("regnet_y_400mf"), "image"),
    "lraspp_mobilenet_v3_large": ("torchvision", _tv_seg("lraspp_mobilenet_v3_large"), "image"),
    "r3d_18": ("torchvision", lambda: __import__("torchvision").models.video.r3d_18(), "video"),
    "ssdlite320_mobilenet_v3_large": (
        "torchvision",
        _detection("ssdlite320_mobilenet_v3_large"),
        "detection",
    ),
    "fasterrcnn_resnet50_fpn(FrozenBN)": (
        "torchvision",
        _detection("fasterrcnn_resnet50_fpn(FrozenBN)"),
        "detection",
    ),
    "smp Unet(resnet18)": ("smp", _smp("Unet", "resnet18"), "image"),
    "smp DeepLabV3Plus(resnet18)": ("smp", _smp("DeepLabV3Plus", "resnet18"), "image"),
    "smp Linknet(resnet18)": ("smp", _smp("Linknet", "resnet18"), "image"),
}


def median_ratio(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> float:
    """Median over rounds of time(a) / time(b), the two run back to back in each round."""
    ratios = []
    with torch.inference_mode():
        for _ in range(3):
            a(), b()
        for _ in range(repeats):
            t0 = time.perf_counter()
            a()
            t1 = time.perf_counter()
            b()
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def run(name: str, size: int, repeats: int) -> dict[str, Any]:
    library, make, kind = MODELS[name]
    torch.manual_seed(0)
    model = randomise_bn_like(make())
    if kind == "video":
        x: Any = torch.randn(1, 3, 8, size // 2, size // 2)
        args: tuple[Any, ...] = (x,)
    elif kind == "detection":
        x = [torch.rand(3, size * 2, size * 2)]
        args = (x,)
    else:
        x = torch.randn(1, 3, size, size)
        args = (x,)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded, report = fold_torch(model, args)
    fold_s = time.perf_counter() - start
    row: dict[str, Any] = {
        "model": name,
        "library": library,
        "bn_like": len(bn_like_paths(model)),
        "decisions": len(report.decisions),
        "backward": sum(
            1 for d in report.folded if d.direction and d.direction.value == "backward"
        ),
        "forward": sum(1 for d in report.folded if d.direction and d.direction.value == "forward"),
        "kept": dict(Counter(d.code.value for d in report.skipped if d.code)),
        "fold_s": fold_s,
        "result": type(folded).__name__,
    }
    with torch.no_grad():
        if kind == "detection":
            batch, _ = model.transform(x)
            ref64 = copy.deepcopy(model.backbone).double()(batch.tensors.double())
            own = model.backbone(batch.tensors)
            out = folded.backbone(batch.tensors)
            row["own_err"] = max(_rel(ref64[k], own[k]) for k in ref64)
            row["err"] = max(_rel(ref64[k], out[k]) for k in ref64)
            row["latency_vs_no_bn"] = row["latency_vs_no_bn_bias"] = None
            return row
        ref = copy.deepcopy(model).double()(x.double())
        row["own_err"] = _rel(ref, model(x))
        row["err"] = _rel(ref, folded(x))
    limit = without_bn(model)
    torch.set_num_threads(1)
    biased = with_biases_of(limit, folded)
    row["latency_vs_no_bn"] = median_ratio(lambda: folded(x), lambda: limit(x), repeats)
    row["latency_vs_no_bn_bias"] = median_ratio(lambda: folded(x), lambda: biased(x), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    chosen = [m for m in opts.models.split(",") if m] or list(MODELS)
    rows = []
    print(
        "| model | library | BN-like | folded bwd / fwd | kept (reasons) | max rel err "
        "(unfolded fp32) | fold s | latency vs no-BN | vs no-BN with biases |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in chosen:
        threads = torch.get_num_threads()
        try:
            row = run(name, opts.size, opts.repeats)
        except ImportError as e:
            print(f"| {name} | skipped: {e} |", flush=True)
            continue
        finally:
            torch.set_num_threads(threads)
        rows.append(row)
        kept = sum(row["kept"].values())
        reasons = ", ".join(f"{k} {v}" for k, v in row["kept"].items())
        lat, lat_b = row["latency_vs_no_bn"], row["latency_vs_no_bn_bias"]
        print(
            f"| {name} | {row['library']} | {row['bn_like']} | {row['backward']} / "
            f"{row['forward']} | {kept}{f' ({reasons})' if reasons else ''} | "
            f"{row['err']:.1e} ({row['own_err']:.1e}) | {row['fold_s']:.2f} | "
            f"{f'{lat:.3f}x' if lat is not None else 'n/a (detection)'} | "
            f"{f'{lat_b:.3f}x' if lat_b is not None else 'n/a'} |",
            flush=True,
        )
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
