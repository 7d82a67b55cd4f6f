"""Demonstration on real data: scikit-learn's handwritten digits, trained, recalibrated, folded.

One command (``pip install -e '.[bench]'`` brings scikit-learn and matplotlib)::

    python bench/demo_digits.py [--out bench/results/demo_digits] [--epochs 6] [--quick]

The 1797 8x8 digit images ship inside scikit-learn (no download). A small CNN with four
BatchNorms, one of them *after* an activation (ReLU -> MaxPool -> BN -> 1x1 Conv, the place
many papers recommend and no peer folds), is trained with batches of 4: its running
statistics are then an exponential average over the last few dozen images, taken while the
weights were still moving. The script reports test accuracy

1. with those trained running statistics;
2. after ``bnfold.recalibrate`` on the training images, labels unused (exact population
   statistics);
3. after ``bnfold.fold`` (PyTorch), and after ``bnfold.export`` run by onnxruntime: the
   predictions must be *identical* to step 2 (the script fails otherwise);
4. after changes that make the statistics stale, each followed by recalibration on unlabeled
   data: 30% of every conv's smallest weights pruned, int8 fake-quantized conv weights, and an
   input distribution shift (lower contrast and an offset, as from another scanner);

and the latency gain of folding at one thread (PyTorch eager, onnxruntime with graph
optimizations off and on, as ratios folded / unfolded). It writes ``accuracy.md``,
``accuracy.json`` and ``bn_stats.png`` (per-layer statistics before and after
recalibration) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnfold
from bench import common

PRUNE_FRACTION = 0.3


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); a stratified 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return (
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
    )


def digits_net() -> nn.Sequential:
    """Conv-BN-ReLU x2, MaxPool, BN after the activation -> 1x1 Conv, Linear-BN-ReLU, Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(32),  # after the activation: folds forward into the 1x1 conv
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(
    xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, batch_size: int, seed: int
) -> nn.Module:
    torch.manual_seed(seed)
    model = digits_net()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    """Unlabeled batches for recalibration (the images alone)."""
    return [x[i : i + size] for i in range(0, len(x), size)]


def prune_convs(model: nn.Module, fraction: float = PRUNE_FRACTION) -> nn.Module:
    """A copy with the ``fraction`` smallest-magnitude weights of every conv set to zero."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                k = int(fraction * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w.mul_((w.abs() > cut).to(w.dtype))
    return pruned


def fake_quantize_convs(model: nn.Module, bits: int = 8) -> nn.Module:
    """A copy with every conv weight rounded to a symmetric per-tensor int grid (int8-style)."""
    quantized = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in quantized.modules():
            if isinstance(m, nn.Conv2d):
                scale = m.weight.abs().max() / qmax
                m.weight.copy_(torch.round(m.weight / scale).clamp(-qmax, qmax) * scale)
    return quantized


def shift_inputs(x: torch.Tensor) -> torch.Tensor:
    """Another scanner: lower contrast, a brighter background (still in [0, 1])."""
    return 0.6 * x + 0.25


def bn_stats(model: nn.Module) -> list[dict[str, np.ndarray]]:
    return [
        {
            "mean": m.running_mean.double().numpy().copy(),
            "var": m.running_var.double().numpy().copy(),
        }
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).double().numpy()


def ort_logits(path: Path | bytes, x: torch.Tensor) -> np.ndarray:
    sess = common.ort_session(path, "all")
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: x.numpy()})[0], dtype=np.float64)


@dataclass
class Row:
    """One line of the accuracy table."""

    state: str
    accuracy: float
    changed: int | None = None  # predictions differing from the row it is compared with
    max_rel: float | None = None  # max relative logit difference to that row
    versus: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DemoResult:
    rows: list[Row] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    fold: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, state: str) -> Row:
        return next(r for r in self.rows if r.state == state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "latency": self.latency,
            "fold": self.fold,
            "seconds": self.seconds,
        }


def accuracy(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.numpy()).mean())


def compare(
    state: str, logits: np.ndarray, ref: np.ndarray, ref_state: str, y: torch.Tensor
) -> Row:
    return Row(
        state,
        accuracy(logits, y),
        changed=int((logits.argmax(1) != ref.argmax(1)).sum()),
        max_rel=common.rel_err(ref, logits),
        versus=ref_state,
    )


def export_and_run(
    model: nn.Module, x_example: torch.Tensor, x: torch.Tensor, folder: Path
) -> tuple[np.ndarray, Any]:
    """``bnfold.export`` (fold, ONNX export, fold, verify) and onnxruntime on ``x``."""
    result = bnfold.export(
        model, folder / "digits.onnx", example_inputs=(x_example,), progress=False
    )
    assert result.output is not None, "bnfold.export wrote nothing (verification failed)"
    return ort_logits(result.output, x), result


def latency_rows(
    model: nn.Module, x1: torch.Tensor, xb: torch.Tensor, repeats: int
) -> list[dict[str, Any]]:
    """Folded / unfolded latency at one thread: PyTorch eager, onnxruntime (DISABLE_ALL, ENABLE_ALL).

    The unfolded ONNX model is the same network exported with its BNs kept; the folded one is
    ``bnfold.fold`` of that very file, so the two differ only by the fold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folded, _ = bnfold.fold(model, (x1,))
        unfolded_onnx = common.export_onnx_keep_bn(model, x1)
        folded_onnx, _ = bnfold.fold(unfolded_onnx)
        folded_bytes = folded_onnx.SerializeToString()
        unfolded_bytes = unfolded_onnx.SerializeToString()
        rows = []
        for label, x in (("batch 1", x1), (f"batch {len(xb)}", xb)):
            xn = x.numpy()
            with torch.inference_mode():
                t = common.interleaved(
                    {"unfolded": lambda x=x: model(x), "folded": lambda x=x: folded(x)},
                    repeats,
                    warmup=3,
                )
            rows.append(_latency_row("PyTorch eager", label, t))
            for level in ("disable", "all"):
                s_u = common.ort_session(unfolded_bytes, level)
                s_f = common.ort_session(folded_bytes, level)
                feed = {s_u.get_inputs()[0].name: xn}
                t = common.interleaved(
                    {
                        "unfolded": lambda s=s_u, f=feed: s.run(None, f),
                        "folded": lambda s=s_f, f=feed: s.run(None, f),
                    },
                    repeats,
                    warmup=3,
                )
                tag = "DISABLE_ALL" if level == "disable" else "ENABLE_ALL"
                rows.append(_latency_row(f"onnxruntime {tag}", label, t))
        return rows
    finally:
        torch.set_num_threads(threads)


def _latency_row(runtime: str, batch: str, t: dict[str, list[float]]) -> dict[str, Any]:
    ms = common.medians_ms(t)
    return {
        "runtime": runtime,
        "batch": batch,
        "unfolded_ms": ms["unfolded"],
        "folded_ms": ms["folded"],
        "ratio": common.time_ratio(t["unfolded"], t["folded"]),
    }


def run_demo(
    out: Path | None,
    *,
    epochs: int = 6,
    batch_size: int = 4,
    seed: int = 0,
    latency: bool = True,
    plot: bool = True,
    repeats: int = 200,
) -> DemoResult:
    """Train, recalibrate, fold, export, perturb, recalibrate; measure. Writes into ``out``.

    Runs on one thread: the network is tiny, and on a shared machine OpenMP workers spinning
    for their share of each small op cost far more than they bring.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, epochs, batch_size, seed, latency, plot, repeats)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: Path | None,
    epochs: int,
    batch_size: int,
    seed: int,
    latency: bool,
    plot: bool,
    repeats: int,
) -> DemoResult:
    start = time.perf_counter()
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits(seed)
    model = train(xtr, ytr, epochs, batch_size, seed)
    res = DemoResult()
    unlabeled = batches(xtr)

    trained = torch_logits(model, xte)
    res.rows.append(Row("trained running statistics (batches of 4)", accuracy(trained, yte)))
    res.stats["trained"] = bn_stats(model)

    recal = copy.deepcopy(model)
    bnfold.recalibrate(recal, unlabeled, progress=False)
    recal_logits = torch_logits(recal, xte)
    recal_state = "bnfold.recalibrate (train images, no labels)"
    res.rows.append(compare(recal_state, recal_logits, trained, res.rows[0].state, yte))
    res.stats["recalibrated"] = bn_stats(recal)

    folded, report = bnfold.fold(recal, (xte[:1],))
    res.fold = report.summary()
    res.rows.append(
        compare(
            "+ bnfold.fold (PyTorch)", torch_logits(folded, xte), recal_logits, recal_state, yte
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx_logits, exported = export_and_run(recal, xte[:2], xte, Path(tmp))
        res.fold["onnx_batchnorms_left"] = exported.batchnorms_left
        res.rows.append(
            compare("+ bnfold.export -> onnxruntime", onnx_logits, recal_logits, recal_state, yte)
        )

        changes: list[tuple[str, nn.Module, torch.Tensor, list[torch.Tensor]]] = [
            (
                f"{PRUNE_FRACTION:.0%} smallest conv weights pruned",
                prune_convs(recal),
                xte,
                unlabeled,
            ),
            ("conv weights int8 fake-quantized", fake_quantize_convs(recal), xte, unlabeled),
            (
                "input shift (contrast 0.6, offset +0.25)",
                copy.deepcopy(recal),
                shift_inputs(xte),
                batches(shift_inputs(xtr)),
            ),
        ]
        for label, changed_model, x_eval, calib in changes:
            stale = torch_logits(changed_model, x_eval)
            res.rows.append(Row(f"{label}: stale statistics", accuracy(stale, yte)))
            bnfold.recalibrate(changed_model, calib, progress=False)
            fresh = torch_logits(changed_model, x_eval)
            state = f"{label}: bnfold.recalibrate (no labels)"
            res.rows.append(compare(state, fresh, stale, res.rows[-1].state, yte))
            if label.startswith("input shift"):
                res.stats["shifted, recalibrated"] = bn_stats(changed_model)
            if label.startswith(f"{PRUNE_FRACTION:.0%}"):
                res.stats["pruned, stale"] = res.stats["recalibrated"]
                res.stats["pruned, recalibrated"] = bn_stats(changed_model)
                sub = Path(tmp) / "pruned"
                sub.mkdir()
                onnx_fresh, _ = export_and_run(changed_model, x_eval[:2], x_eval, sub)
                res.rows.append(
                    compare(
                        f"{label}: + bnfold.export -> onnxruntime", onnx_fresh, fresh, state, yte
                    )
                )

    if latency:
        res.latency = latency_rows(recal, xte[:1], xte[:64], repeats)
    res.seconds = time.perf_counter() - start
    if out is not None:
        write_outputs(res, out, plot)
    return res


def markdown(res: DemoResult) -> str:
    table = common.md_table(
        [
            "model state",
            "test accuracy",
            "predictions changed",
            "max rel logit diff",
            "compared with",
        ],
        [
            (
                r.state,
                f"{r.accuracy:.2%}",
                "-" if r.changed is None else r.changed,
                common.fmt_err(r.max_rel),
                r.versus or "",
            )
            for r in res.rows
        ],
    )
    text = (
        "scikit-learn digits: 1347 training / 450 test images (8x8), CNN with 4 BNs (one after "
        f"an activation), trained with batches of 4. Fold: {res.fold}.\n\n{table}\n"
    )
    if res.latency:
        text += (
            "\nLatency at 1 thread, median of interleaved runs (ratio < 1: folding is faster):\n\n"
        )
        text += common.md_table(
            ["runtime", "batch", "unfolded ms", "folded ms", "folded / unfolded"],
            [
                (
                    r["runtime"],
                    r["batch"],
                    f"{r['unfolded_ms']:.4f}",
                    f"{r['folded_ms']:.4f}",
                    f"{r['ratio']:.3f}",
                )
                for r in res.latency
            ],
        )
        text += "\n"
    return text


def write_outputs(res: DemoResult, out: Path, plot: bool) -> None:
    md = markdown(res)
    paths = list(common.write_results(out, "accuracy", res.to_dict(), md))
    if plot:
        paths.append(plot_stats(res, out / "bn_stats.png"))
    res.files = [str(p) for p in paths]


def plot_stats(res: DemoResult, path: Path) -> Path:
    """Per BN layer and channel: trained running stats, and the exact ones after recalibration.

    Recalibrated statistics are shown for the trained network, after pruning and after the
    input shift, so the plot shows how far each change moves what every BN sees.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("trained running stats (EMA, batches of 4)", res.stats["trained"], "o", "#999999", 28),
        ("recalibrated (exact, before pruning)", res.stats["recalibrated"], "s", "#1f77b4", 10),
        ("recalibrated after 30% pruning", res.stats["pruned, recalibrated"], "x", "#d62728", 22),
        ("recalibrated on shifted inputs", res.stats["shifted, recalibrated"], "+", "#2ca02c", 30),
    ]
    names = ["BN 1 (conv1)", "BN 2 (conv2)", "BN 3 (after ReLU+pool)", "BN 4 (Linear)"]
    layers = len(res.stats["trained"])
    fig, axes = plt.subplots(2, layers, figsize=(4.2 * layers, 7), squeeze=False)
    for j in range(layers):
        for i, key in enumerate(("mean", "var")):
            ax = axes[i][j]
            for label, stats, marker, color, size in series:
                v = stats[j][key]
                ax.scatter(np.arange(len(v)), v, marker=marker, color=color, s=size, label=label)
            if key == "var":
                ax.set_yscale("log")
            title = names[j] if j < len(names) else f"BN {j + 1}"
            ax.set_title(f"{title}: running_{key}", fontsize=10)
            ax.set_xlabel("channel")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    acc = {r.state: r.accuracy for r in res.rows}
    fig.suptitle(
        "Per-layer BatchNorm statistics, digits CNN — test accuracy: trained "
        f"{res.rows[0].accuracy:.1%}, recalibrated {res.rows[1].accuracy:.1%}, pruned stale "
        f"{next(v for k, v in acc.items() if 'pruned: stale' in k):.1%}, pruned recalibrated "
        f"{next(v for k, v in acc.items() if 'pruned: bnfold' in k):.1%}; shifted inputs stale "
        f"{next(v for k, v in acc.items() if k.startswith('input shift') and 'stale' in k):.1%}, "
        f"recalibrated {next(v for k, v in acc.items() if k.startswith('input shift') and 'bnfold' in k):.1%}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_identical(res: DemoResult) -> list[str]:
    """Problems with the fold/export rows: any prediction that moved, any accuracy change."""
    problems = []
    for r in res.rows:
        if r.state.startswith("+") or "+ bnfold.export" in r.state:
            ref = res.row(r.versus or "")
            if r.changed or r.accuracy != ref.accuracy:
                problems.append(f"{r.state}: {r.changed} predictions changed vs {r.versus}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "demo_digits")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=200, help="latency rounds")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 30 latency rounds, no plot")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    res = run_demo(
        args.out,
        epochs=1 if args.quick else args.epochs,
        repeats=30 if args.quick else args.repeats,
        plot=not (args.quick or args.no_plot),
    )
    print(markdown(res))
    print("\n".join(f"wrote {p}" for p in res.files))
    problems = check_identical(res)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
