"""One pass over the data with BatchNorm modules observed through their ``forward``.

The measured sites get a replacement ``forward`` (an instance attribute, removed afterwards)
that reduces the input once to float64 moments and then normalises. This runner serves
``mode="batch"`` (one pass, every site measured) and population mode where the model cannot
be captured as a graph (one pass per depth level, each stopping after its deepest BN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.errors import RecalibrationError
from bnfold.recalib.data import batch_size, call_model, iter_budget, to_device
from bnfold.recalib.options import Options
from bnfold.recalib.stats import FusedBatchNorm, Scratch, Vector, moments
from bnfold.recalib.torch_sites import FunctionalBatchNorm, Site

__all__ = ["PassState", "check_finite", "measure", "run_pass"]


class _StopPass(BaseException):
    """Raised by the last measured BN call of a forward: the rest of the network is not needed.

    A ``BaseException``, so a model that catches ``Exception`` inside its forward cannot
    swallow it.
    """


@dataclass(eq=False)
class PassState:
    """What the measuring forwards of one pass share."""

    scratch: Scratch
    check_finite: bool = True
    calls: int = 0
    stop_at: int = 0
    #: this batch's moments per call, in call order, for the NaN/Inf check after the batch
    seen: list[tuple[Site, Vector, Vector]] = field(default_factory=list)


#: Whether batch mode uses the fused reduce-and-normalise call where it applies. A module
#: switch, read when a pass starts, so a benchmark can time the two-step path beside it.
FUSED_BATCH_MODE = True


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _batch_stats_like(
    n: int, mean: Vector, m2: Vector, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance in ``x``'s dtype and device, for normalising ``x``.

    Host moments are converted with numpy: on ``(C,)`` vectors its per-call cost is a fraction
    of torch's, and this runs once per BN call.
    """
    if isinstance(mean, np.ndarray) and isinstance(m2, np.ndarray):
        kind = np.float32 if x.dtype == torch.float32 else np.float64
        var = m2 / max(n, 1)
        return torch.from_numpy(mean.astype(kind)), torch.from_numpy(var.astype(kind))
    mean_t, m2_t = torch.as_tensor(mean), torch.as_tensor(m2)
    return mean_t.to(x.device, x.dtype), (m2_t / max(n, 1)).to(x.device, x.dtype)


def measure(
    site: Site,
    x: torch.Tensor,
    state: PassState,
    reduced: tuple[int, Vector, Vector] | None = None,
) -> tuple[int, Vector, Vector]:
    """Reduce one BN input to float64 ``(n, mean, M2)`` and feed the site's accumulator.

    The one place both pass runners (module hooks here, the graph frontier in
    :mod:`bnfold.recalib.frontier_run`) measure, so both give the same bits. ``reduced``
    passes moments already computed from ``x`` (by the fused batch-mode call).
    """
    n, mean, m2 = moments(x, 1, state.scratch) if reduced is None else reduced
    site.acc.add_batch(n, mean, m2)
    if state.check_finite:
        state.seen.append((site, mean, m2))
    site.samples += int(x.shape[0]) if x.dim() else 1
    return n, mean, m2


def _measuring_forward(site: Site, state: PassState, batch_stats: bool) -> Any:
    """A replacement ``forward`` for ``site.module`` that measures its input, then normalises.

    The input is reduced once, to float64 ``(n, mean, M2)``, which feed the accumulator. In
    batch mode the same moments then normalise the input (an inference-mode ``batch_norm``
    with the batch's mean and biased variance, which is what a training-mode BN computes), so
    the input is not reduced a second time by the BN itself; on the CPU with the compiled
    kernels the two happen in one fused call that reads the input from memory once
    (:class:`~bnfold.recalib.stats.FusedBatchNorm`). Modules of other types
    (``SyncBatchNorm``, subclasses with their own forward) keep their own forward, switched to
    batch statistics by :meth:`Site.set_batch_stats`.
    """
    module = site.module
    original = module.forward
    own_norm = batch_stats and site.normalises_itself
    eps = float(module.eps)
    fused_call = FusedBatchNorm(eps) if own_norm and FUSED_BATCH_MODE else None

    def forward(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        weight: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        if own_norm:
            if isinstance(module, FunctionalBatchNorm):
                weight, bias = rest[0], rest[1]
            else:
                weight, bias = module.weight, module.bias
            # one read of the input for both the moments and the output, except on the
            # pass's last call, whose output is not used
            last = state.calls + 1 == state.stop_at
            fused = None if fused_call is None or last else fused_call(x, weight, bias)
            if fused is not None:
                measure(site, x, state, fused[:3])
                state.calls += 1
                return fused[3]
        n, mean, m2 = measure(site, x, state)
        state.calls += 1
        if state.calls == state.stop_at:
            raise _StopPass
        if not own_norm:
            return original(x, *rest)
        if _half(x.dtype):
            # half-precision BNs normalise in float32, as training-mode batch_norm does
            y = F.batch_norm(
                x.float(),
                torch.as_tensor(mean).float(),
                (torch.as_tensor(m2) / max(n, 1)).float(),
                None if weight is None else weight.float(),
                None if bias is None else bias.float(),
                False,
                0.0,
                eps,
            )
            return y.to(x.dtype)
        mean_x, var_x = _batch_stats_like(n, mean, m2, x)
        return F.batch_norm(x, mean_x, var_x, weight, bias, False, 0.0, eps)

    return forward


def check_finite(seen: list[tuple[Site, Vector, Vector]], batch: int) -> None:
    """Stop naming the first BN (in call order) whose batch moments are NaN/Inf.

    NaN or Inf anywhere in a BN's input makes its mean or M2 non-finite, so checking the
    ``(C,)`` moments of the batch is enough. All of a batch's moments are checked at once (one
    synchronisation per batch on an accelerator); only a failure looks at them one by one.
    """
    if not seen:
        return
    host = [t for _, m, q in seen for t in (m, q) if isinstance(t, np.ndarray)]
    device = [t for _, m, q in seen for t in (m, q) if isinstance(t, torch.Tensor)]
    if (not host or bool(np.isfinite(np.concatenate(host)).all())) and (
        not device
        or bool(torch.isfinite(torch.cat([t.flatten().to(device[0].device) for t in device])).all())
    ):
        return
    for site, mean, m2 in seen:
        if not (_finite(mean) and _finite(m2)):
            raise RecalibrationError(
                f"BatchNorm {site.name!r} received NaN or Inf activations in batch {batch}; "
                "check the data and the layers before it"
            )


def _finite(v: Vector) -> bool:
    if isinstance(v, np.ndarray):
        return bool(np.isfinite(v).all())
    return bool(torch.isfinite(v).all())


def run_pass(
    runner: nn.Module,
    sites: list[Site],
    data: Iterable[Any],
    *,
    options: Options,
    device: torch.device | None,
    scratch: Scratch,
    progress: Any,
    description: str,
) -> tuple[int, int]:
    """One pass over the data with the active sites measured; returns (batches, samples).

    The first batch runs the whole forward and counts the calls of active BNs; every later
    batch stops (:class:`_StopPass`) right after that many calls, so a pass costs only the
    prefix of the network up to its deepest measured BN. This assumes the BN calls of a
    forward do not depend on the data, as in every static-shape network.
    """
    active = [s for s in sites if s.active]
    state = PassState(scratch, check_finite=options.check_finite)
    batch_stats = options.mode == "batch"
    patched: list[tuple[nn.Module, Any]] = []
    for s in active:
        # keep a forward the caller set on the instance, to put it back afterwards
        patched.append((s.module, s.module.__dict__.get("forward")))
        # an instance attribute shadows the class's forward; nn.Module declares forward as
        # a callable attribute, which is what is assigned here
        target: nn.Module = s.module
        target.forward = _measuring_forward(s, state, batch_stats)
    batches = samples = 0
    task = progress.add_task(description, total=options.num_batches)
    try:
        with torch.no_grad():
            for i, batch in enumerate(
                iter_budget(data, num_samples=options.num_samples, num_batches=options.num_batches)
            ):
                batch = to_device(batch, device)
                state.calls = 0
                with contextlib.suppress(_StopPass):
                    call_model(runner, batch, options.forward_fn)
                if i == 0:
                    state.stop_at = state.calls
                batches += 1
                samples += batch_size(batch)
                check_finite(state.seen, i + 1)
                state.seen.clear()
                progress.advance(task)
    finally:
        for module, previous in patched:
            del module.forward
            if previous is not None:
                module.forward = previous
        progress.remove_task(task)
    return batches, samples
