"""``bnfold.verify``: prove that a folded model computes what the original computes.

The reference runs independently of the candidate's optimizations: an ONNX reference runs on
onnxruntime's CPU provider with every graph optimization off (otherwise onnxruntime folds the
original's BatchNorms itself and the check compares a fold with a fold), a PyTorch reference
runs eagerly, in float64 by default. The candidate runs as deployed: an ONNX candidate with
onnxruntime's default optimizations on each requested provider, a PyTorch candidate eagerly
on ``cpu`` or ``cuda``. A provider that cannot run is reported as *not run*, never passed.

Every output of every provider gets error statistics and an ``allclose``-style verdict whose
tolerances default from the dtype (see :mod:`bnfold.verification.compare`). With a
``baseline`` (the unfolded model), the verdict is instead whether the candidate's error stays
within a small factor of the baseline's own error against the same reference
(:mod:`bnfold.verification.floor`). With a FoldReport, a failing verification names the first
fold whose preserved tensor differs (:mod:`bnfold.verification.localize`).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BadInputError
from bnfold.report import FoldReport
from bnfold.verification.compare import Accumulator, OutputStats, ToleranceArg, resolve_tolerance
from bnfold.verification.floor import EXPORTER_FAR_OFF, floor_verdict
from bnfold.verification.inputs import (
    Batch,
    InputSpec,
    generate_batches,
    load_batches,
    parse_shapes,
)
from bnfold.verification.localize import DEFAULT_CHUNK, load_fold_report, localise
from bnfold.verification.report import Localisation, ProviderResult, VerifyReport
from bnfold.verification.runners import (
    ModelSource,
    OrtRunner,
    TorchRunner,
    available_providers,
    is_torch_module,
    load_model_source,
    ort_provider_name,
)

__all__ = ["verify", "VerifyReport", "ProviderResult", "Localisation", "OutputStats"]


def verify(
    reference: Any,
    candidate: Any,
    *,
    inputs: Any = None,
    data: Any = None,
    providers: Sequence[str] | str = ("cpu",),
    rtol: ToleranceArg = None,
    atol: ToleranceArg = None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    seed: int = 0,
    num_batches: int | None = None,
    fold_report: FoldReport | Mapping[str, Any] | str | Path | None = None,
    progress: bool | None = None,
    reference_float64: bool = True,
    localise_chunk: int = DEFAULT_CHUNK,
    baseline: Any = None,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    Args:
        reference: the original model: ``.onnx`` path, ``onnx.ModelProto`` or
            ``torch.nn.Module``. Never modified.
        candidate: the model to check (e.g. the folded one), same kinds. Never modified.
        inputs: one batch given directly: an array/tensor (single-input models), a tuple of
            them (in input order) or a mapping input name -> array.
        data: real batches: ``.npy``/``.npz`` path, array, mapping, or an iterable such as a
            DataLoader (see :mod:`bnfold.verification.inputs`).
        providers: where the candidate runs: ``cpu``, ``cuda`` or onnxruntime provider names
            (a comma-separated string works too).
        rtol: relative tolerance for every output (float) or by output name (mapping;
            ``"*"`` for the rest). None: the dtype default.
        atol: absolute tolerance, likewise. None: the dtype default (relative to the output's
            largest reference magnitude).
        shapes: sizes for symbolic input dims: ``{"input": (8, 3, 224, 224)}`` or
            ``["input:8x3x224x224"]``. A symbolic leading dim left unset is 1.
        seed: seed of the generated inputs.
        num_batches: batches to compare: generated ones (default 1), or the first ones of
            ``data`` (default all).
        fold_report: the candidate's FoldReport (object, dict, or JSON path) to localise a
            failure to one fold; both models must be ONNX for that.
        progress: show a progress bar on stderr (None: when stderr is a terminal).
        reference_float64: run a PyTorch reference in float64.
        localise_chunk: intermediate tensors exposed per localisation run.
        baseline: the unfolded model (same kinds as ``candidate``), run on the same providers
            and inputs. Its error against the reference is the noise floor: each output
            passes when the candidate's max abs error is at most ``FLOOR_FACTOR`` times the
            floor plus a few ulps (:mod:`bnfold.verification.floor`). Explicit ``rtol`` /
            ``atol`` replace that rule by the fixed tolerance. Never modified.

    Returns:
        A :class:`VerifyReport`; ``report.passed`` is True only when every requested
        provider ran and every output passed.

    Raises:
        BadInputError: unreadable model or data, incompatible outputs, bad shapes or options.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInputError(f"seed must be an integer >= 0, not {seed!r}")
    provider_list = _provider_list(providers)
    shape_map = _shape_map(shapes)
    report_obj = load_fold_report(fold_report) if fold_report is not None else None
    if inputs is not None and data is not None:
        raise BadInputError("give inputs= or data=, not both")

    ref_is_torch = is_torch_module(reference)
    cand_is_torch = is_torch_module(candidate)
    ref_src = None if ref_is_torch else load_model_source(reference)
    cand_src = None if cand_is_torch else load_model_source(candidate)

    ref_ort = OrtRunner(ref_src, optimized=False) if ref_src is not None else None
    available = available_providers()
    runners, results = _candidate_runners(candidate, cand_src, provider_list, available)
    cand_ort = next((r for r in runners.values() if isinstance(r, OrtRunner)), None)
    base_runners: dict[str, OrtRunner | TorchRunner] = {}
    base_src = None
    if baseline is not None:
        base_src = None if is_torch_module(baseline) else load_model_source(baseline)
        base_runners, _ = _candidate_runners(baseline, base_src, list(runners), available)

    if ref_ort is not None and cand_ort is not None:
        _same_names(ref_ort, cand_ort)
    specs = _specs(ref_ort, cand_ort, cand_src)
    any_ort = ref_ort or cand_ort
    onnx_names = any_ort.output_names if any_ort else None
    ref_runner: OrtRunner | TorchRunner = ref_ort or TorchRunner(
        reference, float64=reference_float64, output_names=onnx_names
    )
    for runner in [*runners.values(), *base_runners.values()]:
        if isinstance(runner, TorchRunner) and onnx_names:
            runner.output_names = list(onnx_names)

    batches, total = _batches(specs, inputs, data, shape_map, seed, num_batches)
    accs: dict[str, dict[str, Accumulator]] = {p: {} for p in runners}
    base_accs: dict[str, dict[str, Accumulator]] = {p: {} for p in base_runners}
    first_batch: Batch | None = None
    count = 0
    with _progress(progress) as bar:
        task = bar.add_task("verifying", total=total)
        for batch in batches:
            if first_batch is None:
                first_batch = batch
            ref_out = ref_runner.run(batch)
            for p, runner in runners.items():
                cand_out = runner.run(batch)
                for name, (cand, ref) in _pair(cand_out, ref_out).items():
                    acc = accs[p].get(name)
                    if acc is None:
                        tol = resolve_tolerance(name, cand.dtype, rtol, atol)
                        acc = accs[p][name] = Accumulator(name, tol)
                    acc.add(cand, ref)
                if p in base_runners:
                    _accumulate(base_accs[p], base_runners[p].run(batch), ref_out, rtol, atol)
            count += 1
            bar.update(task, advance=1)

    compared = {name for by_output in accs.values() for name in by_output}
    for what, arg in (("--rtol/rtol", rtol), ("--atol/atol", atol)):
        unknown = sorted(set(arg) - compared - {"*"}) if isinstance(arg, Mapping) else []
        if unknown and compared:
            raise BadInputError(
                f"{what} names output(s) {', '.join(unknown)} that the model does not have; its "
                f"outputs are: {', '.join(sorted(compared))}"
            )
    use_floor = baseline is not None and rtol is None and atol is None
    for p, runner in runners.items():
        stats = [a.result() for a in accs[p].values()]
        if use_floor and p in base_accs:
            stats = _judge_by_floor(stats, base_accs[p])
        results[p] = ProviderResult(
            provider=p,
            runtime=_runtime(runner),
            verdict="pass" if all(s.passed for s in stats) else "fail",
            outputs=stats,
        )
    report = VerifyReport(
        reference=_label(reference, ref_src, "onnxruntime CPU, optimizations off")
        if not ref_is_torch
        else _label(reference, None, "torch eager" + (" float64" if reference_float64 else "")),
        candidate=_label(candidate, cand_src, None),
        providers=[results[p] for p in provider_list],
        batches=count,
        seed=seed if inputs is None and data is None else None,
        available_providers=available,
    )
    if baseline is not None:
        report.baseline = _label(baseline, base_src, None)
        report.rule = "floor" if use_floor else "tolerance"
        problems = report.exporter_problems
        if problems:
            report.notes.append(
                "the unfolded model itself differs from the reference by more than "
                f"{EXPORTER_FAR_OFF:.0%} of the output's scale ({', '.join(problems)}): an "
                "exporter or runtime problem, not a fold failure"
            )
    if report_obj is not None and report.verdict == "fail" and first_batch is not None:
        if ref_src is None or cand_src is None:
            report.notes.append("localisation needs the original and the candidate as ONNX")
        else:
            with _progress(progress) as bar:
                task = bar.add_task("localising", total=len(report_obj.folded))
                report.localisation, notes = localise(
                    ref_src,
                    cand_src,
                    report_obj,
                    first_batch,
                    rtol=rtol,
                    atol=atol,
                    chunk=localise_chunk,
                    on_chunk=lambda done, _total: bar.update(task, completed=done),
                )
            report.notes.extend(notes)
    return report


def _same_names(reference: OrtRunner, candidate: OrtRunner) -> None:
    """Two ONNX models are compared name by name: inputs and outputs must be the same sets."""
    for what, ref, cand in (
        ("inputs", [i.name for i in reference.session.get_inputs()],
         [i.name for i in candidate.session.get_inputs()]),
        ("outputs", reference.output_names, candidate.output_names),
    ):  # fmt: skip
        if set(ref) != set(cand):
            raise BadInputError(
                f"the candidate's {what} ({', '.join(cand) or 'none'}) differ from the "
                f"original's ({', '.join(ref) or 'none'}); the models must have the same "
                f"{what} to be compared"
            )


def _accumulate(
    accs: dict[str, Accumulator],
    out: dict[str, np.ndarray],
    ref_out: dict[str, np.ndarray],
    rtol: ToleranceArg,
    atol: ToleranceArg,
) -> None:
    # keyed by the reference's names, which the candidate's statistics also carry
    for name, (ref, value) in _pair(ref_out, out).items():
        acc = accs.get(name)
        if acc is None:
            acc = accs[name] = Accumulator(name, resolve_tolerance(name, value.dtype, rtol, atol))
        acc.add(value, ref)


def _judge_by_floor(stats: list[OutputStats], base: dict[str, Accumulator]) -> list[OutputStats]:
    """Each output's verdict against the baseline's error on the same output."""
    judged = []
    for s in stats:
        acc = base.get(s.output)
        if acc is None:
            judged.append(s)
            continue
        verdict = floor_verdict(s, acc.result())
        judged.append(dataclasses.replace(s, floor=verdict, passed=verdict.passed))
    return judged


def _provider_list(providers: Sequence[str] | str) -> list[str]:
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    out: list[str] = []
    for p in items:
        name = p.strip()
        if not name:
            raise BadInputError("empty provider name; use e.g. providers=('cpu', 'cuda')")
        if name not in out:
            out.append(name)
    if not out:
        raise BadInputError("no provider requested; use e.g. providers=('cpu',)")
    return out


def _shape_map(
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None,
) -> dict[str, tuple[int, ...]]:
    if shapes is None:
        return {}
    if isinstance(shapes, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
    if isinstance(shapes, str):
        return parse_shapes([shapes])
    return parse_shapes(shapes)


def _candidate_runners(
    candidate: Any,
    src: ModelSource | None,
    providers: list[str],
    available: list[str],
) -> tuple[dict[str, OrtRunner | TorchRunner], dict[str, ProviderResult]]:
    """A runner per provider that can run; a not-run result for every other one."""
    runners: dict[str, OrtRunner | TorchRunner] = {}
    results: dict[str, ProviderResult] = {}
    for p in providers:
        runner: OrtRunner | TorchRunner | None
        reason: str | None
        if src is None:
            runner, reason = _torch_candidate(candidate, p)
            runtime = f"torch:{p.lower()}"
        else:
            runtime = ort_provider_name(p)
            runner, reason = _ort_candidate(src, runtime, available)
        if runner is None:
            results[p] = ProviderResult(p, runtime, "not-run", reason=reason)
        else:
            runners[p] = runner
    return runners, results


def _ort_candidate(
    src: ModelSource, provider: str, available: list[str]
) -> tuple[OrtRunner | None, str | None]:
    if provider not in available:
        return None, (
            f"{provider} is not available in this onnxruntime; available providers: "
            + ", ".join(available)
        )
    try:
        runner = OrtRunner(src, provider, optimized=True)
    except BadInputError as e:
        if provider == "CPUExecutionProvider":
            raise
        # The model loads on CPU (the reference did); this provider is what failed to start.
        return None, f"{provider} could not start a session: {e}"
    if provider not in runner.session.get_providers():
        # onnxruntime falls back to CPU when a provider's libraries fail to load: that run
        # would not be the requested one.
        return None, (
            f"{provider} is installed but could not start (missing CUDA/cuDNN libraries or no "
            f"device?); providers that started: {', '.join(runner.session.get_providers())}"
        )
    return runner, None


def _torch_candidate(module: Any, provider: str) -> tuple[TorchRunner | None, str | None]:
    key = provider.lower()
    if key not in ("cpu", "cuda"):
        return None, f"a torch candidate runs on cpu or cuda, not {provider}"
    if key == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None, "torch has no CUDA device here; available devices: cpu"
    return TorchRunner(module, device=key), None


def _specs(
    ref: OrtRunner | None, cand: OrtRunner | None, cand_src: ModelSource | None
) -> list[InputSpec] | None:
    if ref is not None:
        return ref.input_specs()
    if cand is not None:
        return cand.input_specs()
    if cand_src is not None:
        # The ONNX candidate's every provider is unavailable: still read its inputs on CPU.
        return OrtRunner(cand_src, optimized=False).input_specs()
    return None


def _specs_from_example(example: Any) -> list[InputSpec]:
    """Input specs for two torch modules, taken from the first batch the user gave."""
    if isinstance(example, Mapping):
        items = list(example.items())
    elif isinstance(example, (tuple, list)):
        items = [(f"input_{i}", v) for i, v in enumerate(example)]
    else:
        items = [("input_0", example)]
    specs = []
    for name, value in items:
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        specs.append(InputSpec(str(name), arr.dtype, tuple(arr.shape)))
    return specs


def _batches(
    specs: list[InputSpec] | None,
    inputs: Any,
    data: Any,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    num_batches: int | None,
) -> tuple[Iterator[Batch], int | None]:
    """The batches to compare and their count (None when a data iterable does not say)."""
    if specs is None:
        # Two torch modules: the inputs define the specs.
        if inputs is not None:
            specs = _specs_from_example(inputs)
        elif data is not None and not isinstance(data, (str, Path)):
            iterator = iter(data)
            try:
                first = next(iterator)
            except StopIteration:
                raise BadInputError("the data holds no batches; give at least one") from None
            specs = _specs_from_example(first)
            data = itertools.chain([first], iterator)
        else:
            raise BadInputError(
                "two torch modules need inputs= (an example batch) or data= (an iterable)"
            )
    if inputs is not None:
        return iter(list(load_batches([inputs], specs))), 1
    if data is not None:
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = _len(data, specs)
        return load_batches(data, specs, num_batches=num_batches), total
    n = 1 if num_batches is None else num_batches
    return iter(generate_batches(specs, shapes, seed=seed, num_batches=n)), n


def _len(data: Any, specs: list[InputSpec]) -> int | None:
    """Batches in ``data`` when it says so; None for arrays, mappings and paths/specs."""
    if isinstance(data, (np.ndarray, Mapping, str, Path)):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def _pair(
    cand: dict[str, np.ndarray], ref: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Match outputs by name, or by position when the names differ (torch vs ONNX)."""
    if set(cand) == set(ref):
        return {n: (cand[n], ref[n]) for n in cand}
    if len(cand) != len(ref):
        raise BadInputError(
            f"the candidate has {len(cand)} outputs ({', '.join(cand)}), the reference "
            f"{len(ref)} ({', '.join(ref)}); they must compute the same outputs"
        )
    return {n: (c, r) for (n, c), r in zip(cand.items(), ref.values(), strict=True)}


def _runtime(runner: OrtRunner | TorchRunner) -> str:
    if isinstance(runner, OrtRunner):
        return runner.provider
    return f"torch:{runner.device.type}"


def _label(model: Any, src: ModelSource | None, how: str | None) -> str:
    base = src.label if src is not None else type(model).__name__
    return f"{base} ({how})" if how else base


class _NoProgress:
    """The progress interface, doing nothing (progress disabled)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress(enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    )
