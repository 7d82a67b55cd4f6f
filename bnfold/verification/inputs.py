"""Inputs for a verification run: generated from a model's input types, or real batches.

Generated inputs are reproducible from a seed. Their shapes come from the model; a symbolic
dimension takes the size the user gives (``{"input": (8, 3, 224, 224)}``, or on the command
line ``--shape input:8x3x224x224``). A symbolic *leading* dimension that the user leaves
unset defaults to 1, because it is almost always the batch and a batch of one is what a
deployment check needs; any other unset symbolic dimension is a :class:`BadInputError` naming
it, since guessing a sequence length or an image size would verify a model on inputs it never
sees.

Values per dtype: floats are standard normal (cast to float16/bfloat16 after drawing in
float32), integers are uniform in ``[0, 4)`` (small, so that index-like inputs stay in range),
booleans are fair coin flips.

Real data may be a ``.npy`` file (single-input models), a ``.npz`` file (one array per input
name, or per position), ``module:function`` returning an iterable of batches (files and specs
are read by :mod:`bnfold.data`, shared with recalibration), a mapping of input name to array,
an array, or any iterable of batches (a ``torch.utils.data.DataLoader`` included). An iterable batch may be a tensor, a mapping, or
a tuple/list whose first ``n`` items feed the ``n`` model inputs in order (so ``(x, label)``
pairs from a classification loader work as they are).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.data import as_numpy, is_function_spec, load_function_spec, read_array_file
from bnfold.errors import BadInputError

__all__ = [
    "InputSpec",
    "Batch",
    "parse_shape",
    "parse_shapes",
    "resolve_shape",
    "generate_batches",
    "load_batches",
    "specs_from_session",
    "ort_type_to_numpy",
]

#: One batch: input name -> array.
Batch = dict[str, np.ndarray]

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint64)": "uint64",
    "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

_INT_HIGH = 4


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name, numpy dtype and shape (ints, or names/None for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def ort_type_to_numpy(type_str: str) -> np.dtype:
    """The numpy dtype of an onnxruntime type string such as ``tensor(float)``."""
    name = _ORT_TYPES.get(type_str)
    if name is None:
        raise BadInputError(
            f"input type {type_str} is not supported by bnfold verify; supported: "
            + ", ".join(sorted(_ORT_TYPES))
        )
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def specs_from_session(session: Any) -> list[InputSpec]:
    """Input specs from an ``onnxruntime.InferenceSession`` (no need to load the model twice)."""
    return [
        InputSpec(i.name, ort_type_to_numpy(i.type), tuple(_dim(d) for d in i.shape))
        for i in session.get_inputs()
    ]


def _dim(d: Any) -> int | str | None:
    if isinstance(d, int) and d >= 0:
        return d
    return d if isinstance(d, str) and d else None


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name:8x3x224x224`` into ``("name", (8, 3, 224, 224))``.

    The name may itself contain colons; the last colon separates the dims.
    """
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise BadInputError(f"--shape {text!r} must look like NAME:8x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise BadInputError(
            f"--shape {text!r}: dims must be positive integers joined by 'x', e.g. 8x3x224x224"
        ) from None
    if any(d <= 0 for d in shape):
        raise BadInputError(f"--shape {text!r}: every dim must be a positive integer")
    return name, shape


def parse_shapes(texts: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--shape`` options into a mapping; a repeated name is an error."""
    out: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, shape = parse_shape(text)
        if name in out:
            raise BadInputError(f"--shape given twice for input {name!r}; give it once")
        out[name] = shape
    return out


def resolve_shape(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
    """The concrete shape of an input: the user's, checked against the model, or the model's.

    Raises:
        BadInputError: the given shape contradicts a fixed dim or the rank, or a non-leading
            symbolic dim has no size.
    """
    if given is not None:
        given = tuple(int(d) for d in given)
        if len(given) != len(spec.shape):
            raise BadInputError(
                f"shape {_fmt(given)} for input {spec.name!r} has rank {len(given)}, the model "
                f"expects rank {len(spec.shape)} ({_fmt(spec.shape)})"
            )
        for axis, (g, m) in enumerate(zip(given, spec.shape, strict=True)):
            if isinstance(m, int) and g != m:
                raise BadInputError(
                    f"shape {_fmt(given)} for input {spec.name!r}: dim {axis} is fixed to {m} "
                    f"in the model, not {g}"
                )
        return given
    out = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            out.append(d)
        elif axis == 0:
            out.append(1)
        else:
            label = d if d else f"dim {axis}"
            raise BadInputError(
                f"input {spec.name!r} has a symbolic dimension {label!r} at axis {axis}; set it "
                f"with --shape {spec.name}:{_example(spec.shape)} (shapes={{{spec.name!r}: ...}})"
            )
    return tuple(out)


def _fmt(shape: Sequence[Any]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def _example(shape: Sequence[Any]) -> str:
    return "x".join(str(d) if isinstance(d, int) else "N" for d in shape)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, _INT_HIGH, size=shape).astype(dtype)
    if dtype == np.float64:
        return rng.standard_normal(shape)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def generate_batches(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
    num_batches: int = 1,
) -> list[Batch]:
    """Random batches for ``specs``, reproducible from ``seed``.

    Args:
        specs: the model's inputs.
        shapes: sizes for inputs with symbolic dims, by input name.
        seed: the numpy generator seed; the same seed gives the same batches.
        num_batches: how many batches to draw.
    """
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise BadInputError(
            f"shape given for unknown input(s) {', '.join(sorted(unknown))}; the model's inputs "
            f"are: {', '.join(s.name for s in specs)}"
        )
    if num_batches < 1:
        raise BadInputError(f"number of batches must be at least 1, not {num_batches}")
    concrete = [(s, resolve_shape(s, shapes.get(s.name))) for s in specs]
    _check_memory(concrete, num_batches)
    rng = np.random.default_rng(seed)
    return [
        {s.name: _random(rng, s.dtype, shape) for s, shape in concrete} for _ in range(num_batches)
    ]


def _available_memory() -> int | None:
    """Bytes of memory available to this process (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(concrete: Sequence[tuple[InputSpec, tuple[int, ...]]], num_batches: int) -> None:
    """Refuse inputs that cannot fit before drawing them, with the figure.

    Generated batches are all held at once, and each run also holds the model's activations
    and outputs for a batch, so the inputs may take at most a quarter of available memory.
    """
    one = sum(math.prod(shape) * np.dtype(s.dtype).itemsize for s, shape in concrete)
    need = one * num_batches
    available = _available_memory()
    if available is not None and need > available // 4:
        raise BadInputError(
            f"the generated inputs would take {need / 2**30:.1f} GiB ({num_batches} batch(es) of "
            f"{one / 2**30:.2f} GiB), more than a quarter of the {available / 2**30:.1f} GiB "
            "available; give smaller --shape sizes or fewer --batches"
        )


def _conform(spec: InputSpec, arr: np.ndarray, where: str) -> np.ndarray:
    """Check an array against an input's rank/fixed dims; cast it to the input's dtype.

    Float data is cast to a float input's dtype (float32 data feeds a float16 model); other
    kinds must match, because a silent float -> int cast would verify nonsense.
    """
    if arr.ndim != len(spec.shape):
        raise BadInputError(
            f"{where}: array of shape {_fmt(arr.shape)} for input {spec.name!r} has rank "
            f"{arr.ndim}, the model expects {_fmt(spec.shape)}"
        )
    for axis, (a, m) in enumerate(zip(arr.shape, spec.shape, strict=True)):
        if isinstance(m, int) and a != m:
            raise BadInputError(
                f"{where}: input {spec.name!r} dim {axis} is {a}, the model fixes it to {m}"
            )
    if arr.dtype == spec.dtype:
        return arr
    src_float = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
    dst_float = np.issubdtype(spec.dtype, np.floating) or spec.dtype.name == "bfloat16"
    src_int = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    dst_int = np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_
    if (src_float and dst_float) or (src_int and (dst_int or dst_float)):
        return arr.astype(spec.dtype)
    raise BadInputError(
        f"{where}: input {spec.name!r} expects {spec.dtype.name}, the data is {arr.dtype.name}"
    )


def _split(specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray], where: str) -> list[Batch]:
    """One batch, or several stacked along a leading extra axis (every input alike)."""
    stacked = {s.name: arrays[s.name].ndim == len(s.shape) + 1 for s in specs}
    if all(stacked.values()):
        counts = {arrays[s.name].shape[0] for s in specs}
        if len(counts) != 1:
            raise BadInputError(f"{where}: stacked inputs hold different numbers of batches")
        n = counts.pop()
        return [{s.name: _conform(s, arrays[s.name][i], where) for s in specs} for i in range(n)]
    return [{s.name: _conform(s, arrays[s.name], where) for s in specs}]


def _by_name(specs: Sequence[InputSpec], mapping: Mapping[str, Any], where: str) -> dict:
    names = [s.name for s in specs]
    if set(names) <= set(mapping):
        return {n: as_numpy(mapping[n], where) for n in names}
    if len(mapping) == len(names):
        # npz files saved with np.savez(*arrays) name them arr_0, arr_1, ...: feed by position.
        return {n: as_numpy(v, where) for n, v in zip(names, mapping.values(), strict=True)}
    missing = [n for n in names if n not in mapping]
    raise BadInputError(
        f"{where}: no data for input(s) {', '.join(missing)}; keys given: "
        f"{', '.join(map(str, mapping)) or 'none'}"
    )


def _from_item(specs: Sequence[InputSpec], item: Any, where: str) -> Batch:
    if isinstance(item, Mapping):
        arrays = _by_name(specs, item, where)
    elif isinstance(item, (tuple, list)):
        if len(item) < len(specs):
            raise BadInputError(
                f"{where}: a batch holds {len(item)} item(s), the model has {len(specs)} inputs"
            )
        arrays = {
            s.name: as_numpy(v, where) for s, v in zip(specs, item[: len(specs)], strict=True)
        }
    else:
        if len(specs) != 1:
            raise BadInputError(
                f"{where}: a single array cannot feed a model with {len(specs)} inputs; give a "
                "mapping of input name to array"
            )
        arrays = {specs[0].name: as_numpy(item, where)}
    return {s.name: _conform(s, arrays[s.name], where) for s in specs}


def load_batches(
    data: Any, specs: Sequence[InputSpec], *, num_batches: int | None = None
) -> Iterator[Batch]:
    """Batches from real data, checked against ``specs`` and cast to their dtypes.

    Args:
        data: a ``.npy``/``.npz`` path, an array, a mapping name -> array, or an iterable of
            batches (DataLoader, list, generator).
        specs: the model's inputs.
        num_batches: stop after this many batches (None: all of them).
    """
    if num_batches is not None and num_batches < 1:
        raise BadInputError(f"number of batches must be at least 1, not {num_batches}")
    batches = _iter_data(data, specs)
    count = 0
    for batch in batches:
        if num_batches is not None and count >= num_batches:
            return
        count += 1
        yield batch
    if count == 0:
        raise BadInputError("the data holds no batches; give at least one")


def _iter_data(data: Any, specs: Sequence[InputSpec]) -> Iterator[Batch]:
    if isinstance(data, str) and is_function_spec(data):
        data = load_function_spec(data)
    elif isinstance(data, (str, os.PathLike)):
        yield from _from_file(Path(data), specs)
        return
    if isinstance(data, np.ndarray) or type(data).__module__.startswith("torch._tensor"):
        if len(specs) != 1:
            raise BadInputError(
                f"one array cannot feed a model with {len(specs)} inputs; give a mapping"
            )
        yield from _split(specs, {specs[0].name: as_numpy(data, "data")}, "data")
        return
    if isinstance(data, Mapping):
        yield from _split(specs, _by_name(specs, data, "data"), "data")
        return
    if not isinstance(data, Iterable):
        raise BadInputError(
            f"data of type {type(data).__name__} is not usable; give a .npy/.npz path, "
            "module:function, an array, a mapping or an iterable of batches"
        )
    for i, item in enumerate(data):
        yield _from_item(specs, item, f"data batch {i}")


def _from_file(path: Path, specs: Sequence[InputSpec]) -> Iterator[Batch]:
    """A ``.npy`` feeds the single input; a ``.npz`` its arrays by name (or position)."""
    loaded = read_array_file(path)
    where = str(path)
    if not isinstance(loaded, dict):
        if len(specs) != 1:
            raise BadInputError(
                f"{path}: a .npy file feeds single-input models only; this one has "
                f"{len(specs)} inputs, give a .npz with one array per input name"
            )
        yield from _split(specs, {specs[0].name: loaded}, where)
        return
    yield from _split(specs, _by_name(specs, loaded, where), where)
