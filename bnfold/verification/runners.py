"""Runners: onnxruntime sessions and eager PyTorch, behind one small interface.

The *reference* ONNX run uses ``GraphOptimizationLevel.ORT_DISABLE_ALL`` on the CPU provider.
With onnxruntime's default optimizations the reference graph has its own Conv+BatchNorm fused
by onnxruntime, so comparing it with a bnfold-folded candidate compares a fold with a fold
and reports a difference of zero where the true one is not. The *candidate* runs as it will
be deployed: default optimizations, on the requested provider.

Provider names: ``cpu`` -> ``CPUExecutionProvider``, ``cuda`` -> ``CUDAExecutionProvider``,
``tensorrt`` -> ``TensorrtExecutionProvider``, ``dml`` -> ``DmlExecutionProvider``,
``coreml`` -> ``CoreMLExecutionProvider``, ``openvino`` -> ``OpenVINOExecutionProvider``;
anything else is taken as an onnxruntime provider name as is.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.verification.inputs import Batch, InputSpec, specs_from_session

__all__ = [
    "PROVIDER_ALIASES",
    "ModelSource",
    "OrtRunner",
    "TorchRunner",
    "available_providers",
    "load_model_source",
    "ort_provider_name",
    "is_torch_module",
]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


def ort_provider_name(name: str) -> str:
    """The onnxruntime name of a provider given as ``cpu``/``cuda``/... or by its own name."""
    key = name.strip()
    if not key:
        raise BadInputError("empty provider name; use e.g. --providers cpu,cuda")
    return PROVIDER_ALIASES.get(key.lower(), key)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build can run."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def is_torch_module(obj: Any) -> bool:
    """True for a ``torch.nn.Module``, without importing torch for ONNX-only runs."""
    return any(
        c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module"
        for c in type(obj).__mro__
    )


@dataclass
class ModelSource:
    """An ONNX model as onnxruntime takes it: a file path (no copy), or serialized bytes."""

    label: str
    path: str | None = None
    proto: Any = None

    def session_arg(self) -> str | bytes:
        if self.path is not None:
            return self.path
        return self.proto.SerializeToString()

    def load(self) -> Any:
        """The ModelProto (loaded from disk on first use, external data included)."""
        if self.proto is None:
            from bnfold.onnx_io import load_onnx

            self.proto = load_onnx(str(self.path))
        return self.proto


def load_model_source(model: Any) -> ModelSource:
    """Wrap a ``.onnx`` path or ``ModelProto`` without copying or editing it."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise BadInputError(f"model file {path} does not exist; give an existing .onnx file")
        return ModelSource(label=str(path), path=str(path))
    if type(model).__name__ == "ModelProto":
        name = model.graph.name or "model"
        return ModelSource(label=f"<ModelProto {name}>", proto=model)
    raise BadInputError(
        f"cannot verify a {type(model).__name__}; give an ONNX path, an onnx.ModelProto or a "
        "torch.nn.Module"
    )


class OrtRunner:
    """One onnxruntime session on one provider.

    Args:
        source: the model.
        provider: onnxruntime provider name (e.g. ``CUDAExecutionProvider``).
        optimized: False turns every graph optimization off (the independent reference).
        extra_outputs: intermediate value names to expose as additional outputs; the model is
            copied for that, never edited.
        threads: intra-op threads (0: onnxruntime's default).
    """

    def __init__(
        self,
        source: ModelSource,
        provider: str = "CPUExecutionProvider",
        *,
        optimized: bool = True,
        extra_outputs: Sequence[str] = (),
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.provider = provider
        self.optimized = optimized
        self.label = source.label
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimized
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.options = opts
        arg: str | bytes
        if extra_outputs:
            arg = _with_outputs(source.load(), extra_outputs).SerializeToString()
        else:
            arg = source.session_arg()
        providers: list[Any] = [provider]
        if provider != "CPUExecutionProvider":
            # A provider that cannot take a node falls back to CPU inside onnxruntime; that is
            # how the model is deployed, so the run is still the deployed one.
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(arg, sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"onnxruntime cannot load {source.label}: {msg}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def input_specs(self) -> list[InputSpec]:
        return specs_from_session(self.session)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> array, in the model's output order."""
        missing = [s.name for s in self.session.get_inputs() if s.name not in batch]
        if missing:
            raise BadInputError(
                f"{self.label} has input(s) {', '.join(missing)} that the batches do not hold "
                f"(they hold {', '.join(batch) or 'nothing'}); original and candidate must "
                "have the same input names"
            )
        feed = {s.name: batch[s.name] for s in self.session.get_inputs()}
        try:
            values = self.session.run(None, feed)
        except Exception as e:  # onnxruntime raises its own types for shape/type errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"onnxruntime could not run the model: {msg}") from None
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}


def _with_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ``model`` whose graph also outputs ``names`` (types left for ORT to infer)."""
    import onnx
    from onnx import helper

    copy_model = onnx.ModelProto()
    copy_model.CopyFrom(model)
    present = {o.name for o in copy_model.graph.output}
    for name in names:
        if name not in present:
            copy_model.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy_model


class TorchRunner:
    """Eager PyTorch on a deep copy of the module (the user's module is never touched).

    Args:
        module: the model.
        float64: run in float64 (the reference): the copy is ``.double()``-ed and floating
            inputs are cast to float64.
        device: ``"cpu"`` or ``"cuda"``.
        output_names: names for the flattened outputs (default ``output_0``, ...).
    """

    def __init__(
        self,
        module: Any,
        *,
        float64: bool = False,
        device: str = "cpu",
        output_names: Sequence[str] | None = None,
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.float64 = float64
        model = copy.deepcopy(module)
        # Verification is about the inference function: BN with running statistics.
        model.eval()
        if float64:
            model = model.double()
        self.module = model.to(self.device)
        self.output_names = list(output_names) if output_names else None

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        import torch

        args = []
        for value in batch.values():
            t = torch.from_numpy(np.ascontiguousarray(value))
            if self.float64 and t.is_floating_point():
                t = t.double()
            args.append(t.to(self.device))
        with torch.inference_mode():
            try:
                out = self.module(*args)
            except Exception as e:  # a forward can raise anything; the message says what
                raise UnsupportedModelError(
                    f"the torch module failed on the verification inputs: {e}"
                ) from None
        flat = _flatten(out)
        names = self.output_names
        if names is None or len(names) != len(flat):
            names = [f"output_{i}" for i in range(len(flat))]
        return {n: _to_numpy(v) for n, v in zip(names, flat, strict=True)}


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        # bfloat16 -> float32 is exact, and so is float32 -> bfloat16 of such a value.
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _flatten(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    raise UnsupportedModelError(
        f"the torch module returned a {type(out).__name__}; verify needs tensors (or tuples, "
        "lists, dicts of them)"
    )
