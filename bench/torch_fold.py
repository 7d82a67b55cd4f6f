"""PyTorch fold benchmark: eager CPU latency and BN left, bnfold beside the peers.

For every reference model (``bnfold.models``): the median eager latency on one CPU thread of
the original, the bnfold-folded model and the same network built without BN (the limit a
fold can reach), measured interleaved in one process and printed as ratios to the original;
then how many BNs bnfold, ``torch.fx.experimental.optimization.fuse`` and
``torch.ao.quantization.quantize_fx.fuse_fx`` leave, and the max relative output error of
each against the original. A second table runs the peers on the cases where they are known
to be wrong.

The second table also holds the patterns that need a fold through an operation (a constant
added after a conv, a channel ``cat``, LeViT's flatten, a pooled classifier head).

A third table folds the randomised test networks (``tests/torchfold/randnet.py``: groups,
padding modes, transposed convs, functional layers, shared and tied modules, train-mode BNs)
with each tool and counts changed outputs, exceptions and BNs left.

Run: ``python bench/torch_fold.py [--repeats 30] [--models resnet-mini,mlp] [--random 200]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import installed, interleaved, medians_ms, rel_err, time_ratio, with_biases_of
from bnfold.models import build, names
from bnfold.models.patterns import ConvAddBN, LinearNorm, MixConv, PoolHead
from bnfold.torchfold import count_batchnorms, fold_torch


def peer(
    fuser: Callable[[nn.Module], nn.Module], model: nn.Module, x: torch.Tensor
) -> tuple[str, str]:
    """(BN left, max rel error) of a peer fuser, or the exception it raised."""
    left, err, _ = peer_model(fuser, model, x)
    return left, err


def peer_model(
    fuser: Callable[[nn.Module], nn.Module], model: nn.Module, x: torch.Tensor
) -> tuple[str, str, nn.Module | None]:
    """(BN left, max rel error, fused model) of a peer fuser, or the exception it raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fuser(copy.deepcopy(model).eval())
            with torch.no_grad():
                err = rel_err(model(x), fused(x))
    except Exception as e:
        return "error", type(e).__name__, None
    left = sum(isinstance(m, _BatchNorm) for m in fused.modules()) + count_batchnorms(fused)
    if isinstance(fused, torch.fx.GraphModule):  # count_batchnorms saw the BN modules called
        left -= sum(
            1
            for n in fused.graph.nodes
            if n.op == "call_module" and isinstance(fused.get_submodule(str(n.target)), _BatchNorm)
        )
    return str(left), f"{err:.1e}", fused


def fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


def ao_fuse_fx(model: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import fuse_fx

    return fuse_fx(model)


def timm_reparameterize(model: nn.Module) -> nn.Module:
    """timm's deployment-time rewrite (``reparameterize_model``: fuses what timm blocks offer)."""
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model, inplace=True)


# name -> (module that must import, fuser); a peer that does not import is 'not installed'.
PEERS: dict[str, tuple[str, Callable[[nn.Module], nn.Module]]] = {
    "fx fuse": ("torch.fx.experimental.optimization", fx_fuse),
    "fuse_fx": ("torch.ao.quantization.quantize_fx", ao_fuse_fx),
    "timm reparameterize": ("timm", timm_reparameterize),
}


def model_row(
    name: str, model: nn.Module, x: torch.Tensor, limit: nn.Module | None, repeats: int
) -> dict[str, Any]:
    """BN left, max rel error and eager latency (1 thread) of bnfold and every installed peer.

    Latency is measured interleaved for the original, bnfold's fold, each peer's output that
    ran, and the no-BN network (the limit); ratios are to the original.
    """
    folded, report = fold_torch(model, x)
    with torch.no_grad():
        err = rel_err(model(x), folded(x))
    peers: dict[str, dict[str, Any]] = {}
    twin = copy.deepcopy(model)
    runs: dict[str, Callable[[], Any]] = {
        "original": lambda m=model, x=x: m(x),
        "original copy": lambda m=twin, x=x: m(x),  # A/A control: the noise of one ratio
        "bnfold": lambda m=folded, x=x: m(x),
    }
    if limit is not None:
        runs["no-bn"] = lambda m=limit, x=x: m(x)
        biased = with_biases_of(limit, folded)
        runs["no-bn+bias"] = lambda m=biased, x=x: m(x)
    for peer_name, (module, fuser) in PEERS.items():
        if installed(module, module.split(".")[0]) is None:
            peers[peer_name] = {"status": "not installed"}
            continue
        left, perr, fused = peer_model(fuser, model, x)
        peers[peer_name] = {"bn_left": left, "max_rel_err": perr}
        if fused is not None:
            runs[peer_name] = lambda m=fused, x=x: m(x)
    with torch.inference_mode():
        times = interleaved(runs, repeats, warmup=3)
    ms = medians_ms(times)
    for peer_name, entry in peers.items():
        if peer_name in ms:
            entry["ratio"] = ms[peer_name] / ms["original"]
    return {
        "model": name,
        "bn": len(report.decisions),
        "original_ms": ms["original"],
        "bnfold_ratio": ms["bnfold"] / ms["original"],
        "limit_ratio": ms["no-bn"] / ms["original"] if "no-bn" in ms else None,
        # the same model timed twice: how far a ratio of two equal networks moves here
        "noise": time_ratio(times["original"], times["original copy"]),
        # folded / limit as the median of per-round ratios (the two ran back to back)
        "vs_limit": time_ratio(times["no-bn"], times["bnfold"]) if "no-bn" in times else None,
        "vs_limit_bias": (
            time_ratio(times["no-bn+bias"], times["bnfold"]) if "no-bn+bias" in times else None
        ),
        "bnfold_left": count_batchnorms(folded),
        "bnfold_reasons": report.summary()["skipped_by_code"],
        "bnfold_err": f"{err:.1e}",
        "fuse": (peers["fx fuse"].get("bn_left", "-"), peers["fx fuse"].get("max_rel_err", "-")),
        "fuse_fx": (peers["fuse_fx"].get("bn_left", "-"), peers["fuse_fx"].get("max_rel_err", "-")),
        "peers": peers,
    }


def zoo_rows(models: list[str], repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for name in models:
        model, x = build(name)
        limit, _ = build(name, bn=False)
        rows.append(model_row(name, model, x, limit, repeats))
        print(f"  {name} done", file=sys.stderr)
    return rows


class _Linear3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


class _SecondUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * torch.sigmoid(y)


def _randomised(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def _peer_cell(left: str, err: str) -> str:
    return f"raises {err}" if left == "error" else f"{left} BN left ({err})"


def case_rows() -> list[dict[str, Any]]:
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [
        ("Linear on 3-D input -> BN1d (C == out)", _Linear3d(), torch.randn(4, 8, 6)),
        (
            "ConvTranspose2d(8, 8, groups=2) -> BN",
            nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=2), nn.BatchNorm2d(8)),
            torch.randn(2, 8, 5, 5),
        ),
        ("conv called at two sites", _SharedConv(), torch.randn(2, 4, 6, 6)),
        ("conv output with a second user", _SecondUser(), torch.randn(2, 4, 6, 6)),
        (
            "Linear -> BN1d(affine=False)",
            nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False)),
            torch.randn(3, 4),
        ),
        ("conv -> + param -> BN", ConvAddBN(), torch.randn(2, 4, 8, 8)),
        ("cat of convs -> BN (MixConv)", MixConv(), torch.randn(2, 4, 8, 8)),
        ("Linear -> flatten -> BN1d -> reshape_as (LeViT)", LinearNorm(), torch.randn(2, 5, 4)),
        ("BN -> AdaptiveAvgPool -> flatten -> Linear", PoolHead(), torch.randn(2, 4, 8, 8)),
        ("cat with a reused input (must stay)", MixConv(reuse=True), torch.randn(2, 4, 8, 8)),
    ]
    rows = []
    for label, model, x in cases:
        model = _randomised(model)
        folded, report = fold_torch(model, x)
        with torch.no_grad():
            err = rel_err(model(x), folded(x))
        d = report.decisions[0]
        rows.append(
            {
                "case": label,
                "bnfold": f"{'folded' if d.folded else d.code.value} ({err:.1e})",  # type: ignore[union-attr]
                "fuse": _peer_cell(*peer(fx_fuse, model, x)),
                "fuse_fx": _peer_cell(*peer(ao_fuse_fx, model, x)),
            }
        )
    return rows


def _bn_total(model: nn.Module) -> int:
    """BN applications (modules called, functional BNs) in a fresh symbolic trace of model."""
    from bnfold.torchfold.ops import as_batchnorm

    gm = torch.fx.symbolic_trace(model)
    return sum(1 for n in gm.graph.nodes if as_batchnorm(n, gm) is not None)


def random_rows(seeds: int) -> list[dict[str, Any]]:
    """bnfold and the peers on the randomised test networks (``tests/torchfold/randnet.py``).

    Counts, over ``seeds`` networks: outputs that changed (max relative error above 1e-4
    against the unfused network), fusers that raised, and the BNs left of those present.
    """
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "torchfold"))
    from randnet import build_random

    def bnfold_fuse(model: nn.Module, x: torch.Tensor) -> nn.Module:
        return fold_torch(model, x)[0]

    tools: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
        "bnfold": bnfold_fuse,
        "fx fuse": lambda m, _x: fx_fuse(copy.deepcopy(m)),
        "fuse_fx": lambda m, _x: ao_fuse_fx(copy.deepcopy(m)),
    }
    stats = {k: {"wrong": 0, "raised": 0, "left": 0, "worst": 0.0} for k in tools}
    total = 0
    for seed in range(seeds):
        model, x = build_random(seed)
        with torch.no_grad():
            ref = model(x.clone())
        n_bn = _bn_total(model)
        total += n_bn
        for name, tool in tools.items():
            st = stats[name]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fused = tool(model, x)
                    with torch.no_grad():
                        out = fused(x.clone())
            except Exception:
                st["raised"] += 1
                st["left"] += n_bn
                continue
            err = max(rel_err(r, o) for r, o in zip(ref, out, strict=True))
            st["wrong"] += err > 1e-4
            if err <= 1e-4:
                st["worst"] = max(st["worst"], err)
            st["left"] += _bn_total(fused)
    return [
        {"tool": k, "networks": seeds, "bn": total, **v}  # type: ignore[dict-item]
        for k, v in stats.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(names()))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--random", type=int, default=200, help="random networks to fold")
    args = parser.parse_args()
    rows = zoo_rows([m for m in args.models.split(",") if m], args.repeats)
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} interleaved runs\n")
    print(
        "| model | BN | original ms | bnfold / orig | no-BN / orig | A/A | bnfold / no-BN | "
        "bnfold / no-BN with biases | BN left: bnfold | fuse | fuse_fx | max rel err: bnfold | "
        "fuse | fuse_fx |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['bn']} | {r['original_ms']:.3f} | {r['bnfold_ratio']:.3f} | "
            f"{r['limit_ratio']:.3f} | {r['noise']:.3f} | {r['vs_limit']:.3f} | {r['vs_limit_bias']:.3f} | "
            f"{r['bnfold_left']} | {r['fuse'][0]} | {r['fuse_fx'][0]} | "
            f"{r['bnfold_err']} | {r['fuse'][1]} | {r['fuse_fx'][1]} |"
        )
    cases = case_rows()
    print("\n| case | bnfold (max rel err) | fx fuse | fuse_fx |")
    print("|---|---|---|---|")
    for c in cases:
        print(f"| {c['case']} | {c['bnfold']} | {c['fuse']} | {c['fuse_fx']} |")
    randoms = random_rows(args.random)
    print(
        f"\n{args.random} random networks ({randoms[0]['bn']} BNs; tests/torchfold/randnet.py)"
        "\n\n| tool | outputs changed (rel err > 1e-4) | raised | BN left | "
        "worst rel err of unchanged |"
    )
    print("|---|---|---|---|---|")
    for r in randoms:
        print(
            f"| {r['tool']} | {r['wrong']} | {r['raised']} | {r['left']} / {r['bn']} | "
            f"{r['worst']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"zoo": rows, "cases": cases, "random": randoms}, f, indent=2)


if __name__ == "__main__":
    main()
