"""Exact BatchNorm recalibration: population statistics of every BN input, from data.

``recalibrate(model, data)`` measures, for every BatchNorm, the per-channel mean and variance
of *all* the values entering it over the data (float64 count/mean/M2, merged with Chan's
formula, so batch size and order do not matter) and stores them as the BN's running
statistics. See :func:`recalibrate` for the decisions (mode, variance convention, safety).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bnfold.recalib.data import ForwardFn
from bnfold.recalib.options import MODES, Options
from bnfold.recalib.report import BNStats, RecalibrationReport
from bnfold.recalib.stats import ESTIMATORS

__all__ = ["recalibrate", "RecalibrationReport", "BNStats", "MODES", "ESTIMATORS"]


def _is_onnx(model: Any) -> bool:
    """A ``.onnx`` path or an ``onnx.ModelProto`` (checked without importing onnx)."""
    if isinstance(model, str | Path):
        return str(model).endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def recalibrate(
    model: Any,
    data: Iterable[Any],
    *,
    num_samples: int | None = None,
    num_batches: int | None = None,
    forward_fn: ForwardFn | None = None,
    mode: str = "population",
    estimator: str = "exact",
    device: Any = None,
    progress: bool = True,
    inplace: bool = True,
    check_finite: bool = True,
    providers: list[str] | None = None,
    data_cache_mb: float = 1024.0,
    spill_mb: float | None = None,
    strategy: str = "auto",
) -> RecalibrationReport:
    """Replace every BatchNorm's running statistics by the exact statistics of ``data``.

    Args:
        model: an ``nn.Module`` (also a ``torch.fx.GraphModule``), a ``torch.export``
            ``ExportedProgram``, an ``onnx.ModelProto`` or the path of a ``.onnx`` file.
        data: any iterable of batches (a DataLoader, a list, a generator; ``len()`` is never
            used). A batch is a tensor (the input), a tuple/list (its *first* element is the
            input, the rest — targets — is ignored), or a dict (keyword arguments; for ONNX:
            input name -> array). numpy arrays are accepted. ``mode="population"`` makes one
            pass per BN depth level; it reads ``data`` once and replays the batches from
            memory when they fit ``data_cache_mb``, else it iterates ``data`` again (which then
            must be re-iterable).
        num_samples: stop after this many samples (the last batch is cut to fit).
        num_batches: stop after this many batches.
        forward_fn: ``forward_fn(model, batch)`` calls the model on a batch of any other shape
            (torch only).
        mode: ``"population"`` (default): upstream BNs use their new population statistics
            while downstream BNs are measured, exactly as at inference (one pass per depth
            level; batch-size independent). ``"batch"``: upstream BNs use batch statistics as
            in training (one pass; what ``swa_utils.update_bn`` does).
        estimator: ``"exact"`` (default): whole-data mean and unbiased variance.
            ``"batch-variance-mean"``: the equal-weight mean of per-batch means and unbiased
            variances that ``swa_utils.update_bn`` computes, only for comparison.
        device: where batches are moved (torch; default: the model's device). The model is
            never moved.
        progress: show a progress bar on stderr.
        inplace: torch only. True (default): update the caller's module (buffers restored if
            anything fails midway); False: work on a deep copy, returned as ``report.model``.
        check_finite: stop with :class:`~bnfold.errors.RecalibrationError` naming the BN that
            received NaN/Inf activations.
        providers: ONNX only: onnxruntime execution providers (default CPU).
        data_cache_mb: ``mode="population"`` keeps up to this many MiB of host batches from
            its first pass and replays copies of them for the later passes, so the loader runs
            once and every level sees the same samples (also with a shuffling or augmenting
            loader, and a generator works). 0 re-reads ``data`` every pass.

    Returns:
        A :class:`RecalibrationReport`; ``report.model`` is the recalibrated model (the same
        module for in-place torch; a new ``ModelProto`` for ONNX — the input is never changed).

    Variance convention: both frameworks store the *unbiased* variance ``M2 / (n - 1)``.
    PyTorch's ``running_var`` is unbiased by definition; ONNX ``BatchNormalization`` uses
    ``input_var`` exactly as PyTorch uses ``running_var`` (``sqrt(var + eps)``), and
    ``torch.onnx.export`` copies ``running_var`` there unchanged, so storing the same number
    keeps an exported-then-recalibrated model and a recalibrated-then-exported one identical.

    Distributed: when ``torch.distributed`` is initialised, each rank passes its own shard;
    statistics are gathered and merged exactly in rank order, so every rank ends with the same
    bits (torch path).
    """
    options = Options(
        num_samples=num_samples,
        num_batches=num_batches,
        forward_fn=forward_fn,
        mode=mode,
        estimator=estimator,
        device=device,
        progress=progress,
        inplace=inplace,
        check_finite=check_finite,
        providers=providers,
        data_cache_mb=data_cache_mb,
        spill_mb=spill_mb,
        strategy=strategy,
    )
    if _is_onnx(model):
        from bnfold.recalib.onnx_driver import recalibrate_onnx

        return recalibrate_onnx(model, data, options)
    from bnfold.recalib.torch_driver import recalibrate_torch

    return recalibrate_torch(model, data, options)
