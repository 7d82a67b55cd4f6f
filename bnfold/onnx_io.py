"""Reading and writing ONNX files without surprises.

``onnx.load`` is lenient: it parses many non-ONNX byte strings into an empty ``ModelProto``
and reports a truncated file as a protobuf ``DecodeError``. These helpers turn every such case
into a :class:`~bnfold.errors.BadInputError` with a one-line message, and write models
atomically (temporary file, then rename), so a failed run never leaves a half-written output.

External data: a model is written with its large tensors in ``<output name>.data`` next to the
output (referenced by a relative location) when asked to, or when it would not fit in one
protobuf (over 2 GB). :func:`load_onnx_info` tells callers whether the source used external
data, so a fold can keep the layout of its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnfold.atomic import atomic_path, check_writable, output_set
from bnfold.errors import BadInputError

__all__ = [
    "LoadedModel",
    "load_onnx",
    "load_onnx_info",
    "save_onnx",
    "check_output_path",
    "uses_external_data",
    "PROTOBUF_LIMIT",
]

#: The largest message protobuf serialises (2 GiB); bigger models need external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors smaller than this stay inside the model file when writing external data.
_EXTERNAL_THRESHOLD = 1024


@dataclass
class LoadedModel:
    """A model read from disk and how it was stored.

    Attributes:
        model: the model with every tensor's data in memory.
        external_data: the file kept (some of) its tensors in external data files.
    """

    model: onnx.ModelProto
    external_data: bool


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of ``model`` refers to an external data file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_onnx_info(path: str | os.PathLike[str]) -> LoadedModel:
    """Load an ONNX file with its external data, refusing anything that is not a model.

    Raises:
        BadInputError: the path is missing or a folder, the bytes are not an ONNX model
            (corrupt or truncated protobuf, no graph or opset), or external data is missing.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"input {p} does not exist; check the path")
    if p.is_dir():
        raise BadInputError(f"input {p} is a folder; give the path of an .onnx file")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as e:
        raise BadInputError(
            f"{p} is not an ONNX model (corrupt or truncated protobuf: {_first_line(e)}); "
            "re-export or re-download it"
        ) from None
    except OSError as e:
        raise BadInputError(f"cannot read {p}: {e.strerror or e}") from None
    if not model.HasField("graph") or not model.opset_import or not model.ir_version:
        raise BadInputError(
            f"{p} is not an ONNX model (no graph, opset or IR version); "
            "give a file written by an ONNX exporter"
        )
    external = uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise BadInputError(
                f"cannot read the external data of {p} ({_first_line(e)}); keep the .data "
                "file(s) next to the model under the names it refers to"
            ) from None
    return LoadedModel(model=model, external_data=external)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file (with external data); see :func:`load_onnx_info` for the checks."""
    return load_onnx_info(path).model


def check_output_path(
    dst: str | os.PathLike[str], src: str | os.PathLike[str] | None = None
) -> Path:
    """Refuse an output path that is the input, sits in a missing or read-only folder, or is a
    folder; returns it as a :class:`Path`."""
    inputs = (Path(src),) if src is not None else ()
    out = check_writable(Path(dst), inputs=inputs)
    if src is not None:
        data = out.with_name(out.name + ".data")
        if data.exists() and data.resolve() == Path(src).resolve():
            raise BadInputError(
                f"output data file {data} is the input file; choose another -o path"
            )
    return out


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically, with external data where needed.

    Args:
        model: the model to write; it is left as it was (external data is written from the
            tensors' bytes without converting the model).
        path: the output file.
        external_data: True writes tensors of 1 KiB or more to ``<name>.data`` next to the
            output; False keeps everything in one file; None decides by size (over 2 GB
            needs external data).

    Returns:
        The path written.

    Raises:
        BadInputError: the model does not fit in one file and ``external_data`` is False.
    """
    out = Path(path)
    size = _approx_size(model)
    if size > PROTOBUF_LIMIT // 2:
        size = model.ByteSize()  # exact, but as slow as serialising: only near the limit
    if external_data is None:
        external_data = size > PROTOBUF_LIMIT
    if not external_data and size > PROTOBUF_LIMIT:
        raise BadInputError(
            f"the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit; "
            "save it with external data"
        )
    # Model and data file are staged together: both replace their destinations, or neither.
    with output_set() as outputs, atomic_path(out) as tmp_model:
        if external_data:
            data_name = out.name + ".data"
            tmp_data = outputs.stage(out.with_name(data_name), ".data")
            if not _write_with_external_data(model, tmp_model, tmp_data, data_name):
                outputs.drop(tmp_data)  # nothing large enough: no data file is needed
        else:
            write_bytes(tmp_model, model.SerializeToString())
    return out


def _write_with_external_data(
    model: onnx.ModelProto, model_path: Path, data_path: Path, location: str
) -> bool:
    """Move large ``raw_data`` tensors to ``data_path`` while serialising, then put them back.

    ``onnx.save_model(save_as_external_data=True)`` converts the caller's model in place;
    here the bytes are only detached for the duration of the write, so the model in memory
    is unchanged afterwards. Returns whether any tensor went to the data file.
    """
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    try:
        with open(data_path, "wb") as data:
            offset = 0
            for tensor in _all_tensors(model):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < _EXTERNAL_THRESHOLD:
                    continue
                raw = tensor.raw_data
                # 4 KiB alignment lets runtimes memory-map each tensor.
                pad = (-offset) % 4096
                if pad:
                    data.write(b"\0" * pad)
                    offset += pad
                data.write(raw)
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (
                    ("location", location),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    entry = tensor.external_data.add()
                    entry.key = key
                    entry.value = value
                offset += len(raw)
        write_bytes(model_path, model.SerializeToString())
        return bool(moved)
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def write_bytes(path: Path, data: bytes, chunk: int = 1 << 24) -> None:
    """Write ``data`` in 16 MiB pieces, so a signal is handled between two of them."""
    view = memoryview(data)
    with open(path, "wb") as f:
        for start in range(0, len(view), chunk):
            f.write(view[start : start + chunk])


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node tensors of the main graph (where large data lives)."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return tensors


def _approx_size(model: onnx.ModelProto) -> int:
    """The bytes of tensor data in the model (from dims, without touching the data): nearly
    all of a large model's size."""
    total = 0
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue
        count = 1
        for d in t.dims:
            count *= d
        total += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
