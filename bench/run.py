"""The benchmark suite: bnfold beside every installed peer, on the same models, in one run.

    python bench/run.py [--quick] [--out bench/results/suite] [--models resnet-mini,mlp]

Sections (each one a script of ``bench/`` that also runs alone):

1. ONNX folding (``bench/onnx_peers.py``): coverage (BNs found, folded, left with reasons;
   invalid outputs counted as such), max relative error vs float64, pass time as a ratio to
   ``onnx.load`` + ``onnx.save``, onnxruntime latency at 1 thread (DISABLE_ALL, ENABLE_ALL)
   for the original, bnfold, each peer and the no-BN network.
2. PyTorch folding (``bench/torch_fold.py``): BNs left, max relative error and eager latency
   at 1 thread for bnfold, torch.fx ``fuse``, torch.ao ``fuse_fx`` and timm's
   ``reparameterize_model``; the cases where peers are wrong; seeded random networks.
3. Recalibration (``bench/recalibrate.py``): statistics error vs a float64 oracle and
   throughput vs a bare forward, beside ``swa_utils.update_bn`` and fvcore's precise BN.
4. Verification cost (``bench/verify.py``) next to the bare onnxruntime runs it needs.
5. The digits demonstration (``bench/demo_digits.py``): accuracy through recalibration,
   folding, export and stale statistics, on real data; its PNG and tables in ``<out>/demo``.
6. CUDA: ``bnfold.verify`` and latency on onnxruntime's CUDA provider, where it exists
   (reported 'not available' otherwise).

Models: the ``bnfold.models`` zoo (random weights, randomised BN statistics) and, when
torchvision / timm import, a few of their architectures. ``--quick`` runs one small model
with few repetitions (the CI smoke). Results go to ``<out>/suite.json`` and ``suite.md``;
the process exits 1 when a section failed (the error is in both files).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, demo_digits, onnx_peers, recalibrate, torch_fold, verify
from bnfold.models import build, names

# Architectures of torchvision / timm measured when they import (random weights: no download).
REAL_MODELS: list[tuple[str, str, tuple[int, ...]]] = [
    ("torchvision", "resnet18", (1, 3, 96, 96)),
    ("torchvision", "mobilenet_v3_small", (1, 3, 96, 96)),
    ("timm", "efficientnet_b0", (1, 3, 96, 96)),  # BatchNormAct2d
    ("timm", "resnet18", (1, 3, 96, 96)),
]


def real_models() -> tuple[list[tuple[str, Callable[[], Any]]], list[str]]:
    """(name, builder) of the real architectures that can be built here, and notes on the rest."""
    from bnfold.models import nets

    found: list[tuple[str, Callable[[], Any]]] = []
    notes = []
    for lib, arch, shape in REAL_MODELS:
        if common.installed(lib) is None:
            notes.append(f"{lib} {arch}: not installed")
            continue

        def make(lib: str = lib, arch: str = arch, shape: tuple[int, ...] = shape) -> Any:
            gen = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            if lib == "torchvision":
                import torchvision

                model = torchvision.models.get_model(arch, weights=None)
            else:
                import timm

                model = timm.create_model(arch, pretrained=False)
            nets.randomise_batchnorm(model, gen)
            model.eval()
            return model, torch.randn(shape, generator=gen), common.without_bn(model)

        found.append((f"{lib}:{arch}", make))
    return found, notes


def model_list(args: argparse.Namespace) -> tuple[list[tuple[str, Callable[[], Any]]], list[str]]:
    chosen = args.models.split(",") if args.models else (["resnet-mini"] if args.quick else names())

    def zoo(name: str) -> Callable[[], Any]:
        def make() -> Any:
            model, x = build(name)
            return model, x, build(name, bn=False)[0]

        return make

    models = [(n, zoo(n)) for n in chosen]
    notes: list[str] = []
    if not args.quick and not args.models and not args.no_real:
        extra, notes = real_models()
        models += extra
    return models, notes


def _heavy(model: torch.nn.Module) -> bool:
    """Over 5M parameters: fewer timing rounds, so the whole suite fits 15 min on 2 cores."""
    return sum(p.numel() for p in model.parameters()) > 5_000_000


def _latency_rounds(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Timing rounds by the cost of one call: 100 below 5 ms, 30 below 60 ms, else 5, so the
    suite fits 15 min on 2 cores while the small models, whose ratios move most between
    rounds, get the most."""
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
        single = time.perf_counter() - t0
    return 100 if single < 0.005 else 30 if single < 0.06 else 5


def section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded (and printed) and the suite goes on."""
    t0 = time.perf_counter()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        # The scripts print their own tables; they go to stderr beside the progress lines.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            results[name] = fn()
    except Exception as e:
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        results.setdefault("failed", []).append(name)
    results.setdefault("seconds", {})[name] = time.perf_counter() - t0


def onnx_section(models: list[tuple[str, Callable[[], Any]]], quick: bool) -> list[dict[str, Any]]:
    out = []
    for name, make in models:
        print(f"  onnx: {name}", file=sys.stderr, flush=True)
        try:
            model, x, limit = make()
            heavy = _heavy(model)
            out.append(
                onnx_peers.coverage(
                    name,
                    model,
                    x,
                    limit,
                    repeat=1 if quick else 2 if heavy else 3,
                    latency_rounds=5 if quick or heavy else 20,
                )
            )
            if name == "resnet-mini" and not quick:  # the exporter that hides bias constants
                out.append(
                    onnx_peers.coverage(
                        name, model, x, limit, exporter="dynamo", repeat=3, latency_rounds=20
                    )
                )
        except Exception as e:
            out.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return out


def torch_section(models: list[tuple[str, Callable[[], Any]]], quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, make in models:
            print(f"  torch: {name}", file=sys.stderr, flush=True)
            try:
                model, x, limit = make()
                repeats = 5 if quick else _latency_rounds(model, x)
                rows.append(torch_fold.model_row(name, model, x, limit, repeats))
            except Exception as e:
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        result: dict[str, Any] = {"zoo": rows}
        if not quick:
            result["cases"] = torch_fold.case_rows()
            result["random"] = torch_fold.random_rows(50)
        return result
    finally:
        torch.set_num_threads(threads)


def recalib_section(quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common.pin_allocator()
    try:
        batches, bs, repeats = (4, 16, 2) if quick else (16, 64, 7)
        return {
            "setup": f"resnet-mini, {batches} batches of {bs}, 1 thread, {repeats} rounds",
            "errors": recalibrate.error_table("resnet-mini", batches, bs),
            "throughput": recalibrate.throughput_table(
                "resnet-mini", batches, bs, repeats, population=True
            ),
            "onnx": recalibrate.onnx_table("resnet-mini", batches, bs),
        }
    finally:
        torch.set_num_threads(threads)


def verify_section(quick: bool) -> dict[str, Any]:
    result = (
        verify.measure("resnet-mini", 2, 1, 1) if quick else verify.measure("resnet50", 4, 1, 2)
    )
    result.pop("report")
    return result


def demo_section(out: Path, quick: bool) -> dict[str, Any]:
    if common.installed("sklearn", "scikit-learn") is None:
        return {"status": "not installed (scikit-learn)"}
    res = demo_digits.run_demo(
        out / "demo",
        epochs=1 if quick else 6,
        repeats=30 if quick else 200,
        plot=not quick and common.installed("matplotlib") is not None,
    )
    problems = demo_digits.check_identical(res)
    if problems:
        raise AssertionError("; ".join(problems))
    return {**res.to_dict(), "files": res.files}


def cuda_section() -> dict[str, Any]:
    """onnxruntime's CUDA provider: verification of a fold and latency, or 'not available'."""
    if not common.cuda_provider_available():
        return {"status": "not available (no onnxruntime CUDA provider here)"}
    import bnfold

    model, x, limit = build("resnet50")[0], build("resnet50")[1], build("resnet50", bn=False)[0]
    src = common.export_onnx_keep_bn(model, x)
    folded, _ = bnfold.fold(src)
    check = bnfold.verify(src, folded, providers=("cuda",), num_batches=4, progress=False)
    lim = common.export_onnx_keep_bn(limit, x)
    feed_x = x.numpy()
    runs = {}
    for label, m in (("original", src), ("bnfold", folded), ("no-BN (limit)", lim)):
        sess = common.ort_session(m.SerializeToString(), "all", provider="cuda")
        feed = {sess.get_inputs()[0].name: feed_x}
        runs[label] = lambda s=sess, f=feed: s.run(None, f)
    times = common.interleaved(runs, 50, warmup=5)
    ms = common.medians_ms(times)
    return {
        "status": "ok",
        "model": "resnet50",
        "verify_passed": bool(check.passed),
        "latency_ms": ms,
        "ratios": {k: common.time_ratio(times["original"], v) for k, v in times.items()},
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": {
            p.name: common.installed(p.module, p.distribution) or "not installed"
            for p in onnx_peers.PEERS
        }
        | {
            "fvcore": common.installed("fvcore") or "not installed",
            "timm": common.installed("timm") or "not installed",
            "torchvision": common.installed("torchvision") or "not installed",
        },
    }


# ---------------------------------------------------------------------------------------------
# Markdown


def _cell(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "err" and isinstance(v, float):
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def onnx_markdown(rows: list[dict[str, Any]]) -> str:
    parts = []
    summary: dict[str, dict[str, Any]] = {}
    for model in rows:
        if "error" in model:
            parts.append(f"**{model['model']}**: error {model['error']}\n")
            continue
        table = []
        for label in ("original", "no-BN (limit)"):
            lat = model["latency"].get(label, {})
            table.append(
                (
                    label,
                    "-",
                    "-",
                    "-",
                    "-",
                    _cell(model["original_max_rel_err"], "err") if label == "original" else "-",
                    "1.00" if label == "original" else "-",
                    _cell(lat.get("ort_disable_ratio")),
                    _cell(lat.get("ort_enable_ratio")),
                )
            )
        for t in model["tools"]:
            s = summary.setdefault(
                t["tool"],
                {
                    "models": 0,
                    "found": 0,
                    "folded": 0,
                    "invalid": 0,
                    "raised": 0,
                    "worst": 0.0,
                    "status": t["status"],
                },
            )
            if t["status"] == "not installed":
                table.append((t["tool"], "not installed", "", "", "", "", "", "", ""))
                continue
            s["models"] += 1
            s["found"] += t["bn_found"]
            if t["status"].startswith("raised"):
                s["raised"] += 1
                table.append((t["tool"], t["status"], "", "", "", "", "", "", ""))
                continue
            if t["status"].startswith("invalid"):
                s["invalid"] += 1
            else:
                s["folded"] += t["bn_folded"]
                s["worst"] = max(s["worst"], t.get("max_rel_err") or 0.0)
            reasons = t.get("reasons")
            left = str(t["bn_left"])
            if reasons:
                left += " (" + ", ".join(f"{k} x{v}" for k, v in reasons.items()) + ")"
            elif t["bn_left"] and t["tool"] != "bnfold":
                left += " (no reason given)"
            table.append(
                (
                    t["tool"],
                    t["status"],
                    f"{t['bn_folded']}/{t['bn_found']}",
                    left,
                    t["extra_nodes"],
                    _cell(t.get("max_rel_err"), "err"),
                    _cell(t["pass_ratio"]),
                    _cell(t.get("ort_disable_ratio")),
                    _cell(t.get("ort_enable_ratio")),
                )
            )
        parts.append(
            f"**{model['model']}** ({model['exporter']} export, {model['bn_found']} BNs, "
            f"load+save {model['io_ms']:.1f} ms)\n\n"
            + common.md_table(
                [
                    "tool",
                    "output",
                    "BN folded",
                    "BN left",
                    "nodes beyond no-BN",
                    "max rel err vs fp64",
                    "pass time x load+save",
                    "ORT DISABLE_ALL latency / orig",
                    "ORT ENABLE_ALL latency / orig",
                ],
                table,
            )
            + "\n"
        )
    head = common.md_table(
        [
            "tool",
            "models run",
            "BNs folded / found",
            "invalid outputs",
            "raised",
            "worst max rel err",
        ],
        [
            (
                k,
                v["models"] if v["status"] != "not installed" else "not installed",
                f"{v['folded']}/{v['found']}",
                v["invalid"],
                v["raised"],
                _cell(v["worst"], "err"),
            )
            for k, v in summary.items()
        ],
    )
    return "### ONNX folding, all models\n\n" + head + "\n\n" + "\n".join(parts)


def torch_markdown(result: dict[str, Any]) -> str:
    peer_names = list(torch_fold.PEERS)
    rows = []
    for r in result["zoo"]:
        if "error" in r:
            rows.append((r["model"], "error", r["error"], *[""] * (6 + len(peer_names))))
            continue
        cells = []
        for p in peer_names:
            e = r["peers"][p]
            if e.get("status") == "not installed":
                cells.append("not installed")
            elif e["bn_left"] == "error":
                cells.append(f"raises {e['max_rel_err']}")
            else:
                ratio = f", {e['ratio']:.3f}" if "ratio" in e else ""
                cells.append(f"{e['bn_left']} left ({e['max_rel_err']}{ratio})")
        left = str(r["bnfold_left"])
        if r["bnfold_reasons"]:
            left += " (" + ", ".join(r["bnfold_reasons"]) + ")"
        rows.append(
            (
                r["model"],
                r["bn"],
                f"{r['original_ms']:.3f}",
                f"{r['bnfold_ratio']:.3f}",
                _cell(r["limit_ratio"]) if r["limit_ratio"] is None else f"{r['limit_ratio']:.3f}",
                f"{r['noise']:.3f}",
                _cell(r["vs_limit"]) if r["vs_limit"] is None else f"{r['vs_limit']:.3f}",
                _cell(r["vs_limit_bias"])
                if r["vs_limit_bias"] is None
                else f"**{r['vs_limit_bias']:.3f}**",
                f"{left} ({r['bnfold_err']})",
                *cells,
            )
        )
    text = "### PyTorch folding (eager, 1 thread; latency as ratio to the original)\n\n"
    text += common.md_table(
        [
            "model",
            "BN",
            "original ms",
            "bnfold / orig",
            "no-BN / orig",
            "A/A: original copy / original",
            "bnfold / no-BN",
            "bnfold / no-BN with biases",
            "bnfold: left (err)",
            *[f"{p}: left (err, latency/orig)" for p in peer_names],
        ],
        rows,
    )
    if "cases" in result:
        text += "\n\n" + common.md_table(
            ["case", "bnfold (max rel err)", "fx fuse", "fuse_fx"],
            [(c["case"], c["bnfold"], c["fuse"], c["fuse_fx"]) for c in result["cases"]],
        )
    if "random" in result:
        text += "\n\nSeeded random networks (tests/torchfold/randnet.py):\n\n" + common.md_table(
            ["tool", "networks", "outputs changed (rel err > 1e-4)", "raised", "BN left"],
            [
                (r["tool"], r["networks"], r["wrong"], r["raised"], f"{r['left']}/{r['bn']}")
                for r in result["random"]
            ],
        )
    return text + "\n"


def recalib_markdown(result: dict[str, Any]) -> str:
    text = f"### Recalibration ({result['setup']})\n\n"
    text += common.md_table(
        ["data", "tool", "max rel err of mean vs fp64", "max rel err of var vs fp64"],
        [
            (
                r["data"],
                r["tool"],
                _cell(r.get("mean_err"), "err"),
                _cell(r.get("var_err"), "err") if "var_err" in r else r.get("status", ""),
            )
            for r in result["errors"]
        ],
    )
    text += "\n\n" + common.md_table(
        ["run", "samples/s", "speed vs bare forward"],
        [
            (
                r["run"],
                f"{r['samples_per_s']:.0f}" if "samples_per_s" in r else r["status"],
                f"{r['vs_bare']:.2f}x" if "vs_bare" in r else "",
            )
            for r in result["throughput"]
        ],
    )
    o = result["onnx"]
    text += (
        f"\n\nONNX driver, one pass: {o['recalibration_s']:.3f} s "
        f"(graphsurgeon probe build {o['graphsurgeon_s']:.4f} s)\n"
    )
    return text


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        f"## bnfold benchmark suite{' (--quick)' if results['quick'] else ''}\n\n"
        f"Machine: {m['machine']}, {m['cpus']} CPUs, {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}. Peers: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Total {sum(results['seconds'].values()):.0f} s.\n"
    ]
    if results.get("notes"):
        parts.append("Not measured: " + "; ".join(results["notes"]) + ".\n")
    renderers: dict[str, Callable[[Any], str]] = {
        "onnx": onnx_markdown,
        "torch": torch_markdown,
        "recalibration": recalib_markdown,
    }
    for name, render in renderers.items():
        r = results.get(name)
        if isinstance(r, dict) and "error" in r:
            parts.append(f"### {name}\n\nfailed: {r['error']}\n")
        elif r is not None:
            parts.append(render(r))
    v = results.get("verify")
    if isinstance(v, dict) and "error" not in v:
        parts.append(
            f"### Verification cost ({v['model']}, {v['batches']} batches of "
            f"{'x'.join(map(str, v['shape']))})\n\n`bnfold.verify` {v['verify_s']:.2f} s vs "
            f"{v['bare_s']:.2f} s of bare onnxruntime sessions and runs: {v['ratio']:.2f}x; "
            f"passed={v['passed']}, max abs {v['max_abs']:.2e}, SQNR {v['sqnr_db']:.1f} dB\n"
        )
    d = results.get("demo")
    if isinstance(d, dict) and "rows" in d:
        parts.append("### Digits demonstration\n\n" + demo_digits.markdown(_demo_result(d)))
    elif isinstance(d, dict):
        parts.append(f"### Digits demonstration\n\n{d.get('status', d.get('error'))}\n")
    c = results.get("cuda")
    if isinstance(c, dict):
        parts.append(f"### CUDA\n\n{c.get('status', c.get('error'))}")
        if c.get("status") == "ok":
            parts.append(
                f"verify passed: {c['verify_passed']}; latency ms: {c['latency_ms']}; "
                f"ratios: {c['ratios']}"
            )
    if results.get("failed"):
        parts.append(f"FAILED sections: {', '.join(results['failed'])}")
    return "\n".join(parts) + "\n"


def _demo_result(d: dict[str, Any]) -> demo_digits.DemoResult:
    return demo_digits.DemoResult(
        rows=[demo_digits.Row(**r) for r in d["rows"]], latency=d["latency"], fold=d["fold"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small model, few repeats (CI smoke)")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/suite[-quick]")
    ap.add_argument("--models", default="", help="comma-separated bnfold.models names")
    ap.add_argument("--no-real", action="store_true", help="skip torchvision/timm models")
    ap.add_argument(
        "--sections",
        default="onnx,torch,recalibration,verify,demo,cuda",
        help="comma-separated subset of: onnx, torch, recalibration, verify, demo, cuda",
    )
    args = ap.parse_args(argv)
    out = args.out or common.RESULTS_DIR / ("suite-quick" if args.quick else "suite")
    chosen = set(args.sections.split(","))
    models, notes = model_list(args)
    results: dict[str, Any] = {"quick": args.quick, "machine": machine(), "notes": notes}
    if "onnx" in chosen:
        section(results, "onnx", lambda: onnx_section(models, args.quick))
    if "torch" in chosen:
        section(results, "torch", lambda: torch_section(models, args.quick))
    if "recalibration" in chosen:
        section(results, "recalibration", lambda: recalib_section(args.quick))
    if "verify" in chosen:
        section(results, "verify", lambda: verify_section(args.quick))
    if "demo" in chosen:
        section(results, "demo", lambda: demo_section(out, args.quick))
    if "cuda" in chosen:
        section(results, "cuda", cuda_section)
    md = markdown(results)
    json_path, md_path = common.write_results(out, "suite", results, md)
    print(md)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
