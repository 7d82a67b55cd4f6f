"""Reading data for bnfold: the ``--data SPEC`` forms and the array types inside a batch.

One module owns this so ``bnfold recalibrate``, ``bnfold verify`` and ``bnfold export`` accept
the same ``--data`` and give the same one-line errors. A SPEC is:

* a ``.npy`` file (one array);
* a ``.npz`` file (one array, or several: one per model input, by name or position);
* a folder of such files (read in sorted name order);
* a folder of images (``.png``, ``.jpg``/``.jpeg``, ``.bmp``, ``.webp``; read with Pillow in
  sorted name order): each image becomes one sample, ``C x H x W`` float32 scaled to
  ``[0, 1]`` (RGB, or one channel when every image is grayscale). bnfold does not resize,
  crop or normalise: give images already preprocessed to the model's input size, or a
  ``module:function`` that applies the model's own transforms;
* ``module:function`` — a function taking no argument that returns an iterable of batches
  (a DataLoader, a list, a generator). The current directory is importable, as for
  ``python -m``, so a ``calib.py`` next to the model works as ``--data calib:batches``.

What a file *means* differs by command and is decided by the caller: recalibration reads
samples stacked on the first axis and cuts them into batches (:func:`load_data_spec`);
verification reads one batch, or batches stacked on an extra leading axis
(:func:`read_array_file` + its own checks against the model's inputs).

Inside a batch, numpy arrays and torch tensors are both accepted; :func:`as_tensor` and
:func:`as_numpy` convert one way or the other, so the drivers see a single type.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BadInputError

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "ArrayBatches",
    "FullBatches",
    "ImageBatches",
    "as_numpy",
    "as_tensor",
    "is_function_spec",
    "load_data_spec",
    "load_function_spec",
    "normalise_batch",
    "read_array_file",
]

ARRAY_SUFFIXES: tuple[str, ...] = (".npy", ".npz")


def as_tensor(x: Any) -> Any:
    """A numpy array becomes a torch tensor (sharing memory); anything else is returned as is."""
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(x)
    return x


def as_numpy(value: Any, what: str = "data") -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array; ``what`` names it in errors."""
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # numpy raises several types for ragged or odd objects
        raise BadInputError(f"{what} cannot be read as an array ({e})") from None


def normalise_batch(batch: Any) -> Any:
    """numpy arrays at the top level of a batch (itself, tuple/list items, dict values) become
    tensors, so models and sample budgets see one type."""
    if isinstance(batch, Mapping):
        return {k: as_tensor(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(as_tensor(v) for v in batch)
    return as_tensor(batch)


def read_array_file(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npy`` file (its array) or a ``.npz`` file (name -> array, in file order).

    Raises:
        BadInputError: the file is missing, has another suffix, is corrupt or holds no array.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"data file {path} does not exist; give a .npy or .npz file")
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise BadInputError(f"data file {path} must be .npy or .npz, not {suffix or 'no suffix'}")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for corrupt files
        raise BadInputError(f"cannot read data file {path}: {e}".splitlines()[0]) from None
    if not arrays:
        raise BadInputError(f"{path} holds no arrays; save at least one with np.savez")
    return arrays


def is_function_spec(spec: str) -> bool:
    """Whether ``spec`` names ``module:function`` rather than a file or folder."""
    module, sep, func = spec.partition(":")
    return bool(sep and module and func) and not Path(spec).exists()


def load_function_spec(spec: str) -> Iterable[Any]:
    """Import ``module`` and return what ``function()`` returns (an iterable of batches)."""
    module_name, _, func_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise BadInputError(f"cannot import {module_name!r} from --data {spec}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise BadInputError(f"{module_name} has no function {func_name!r} (--data {spec})")
    try:
        data = fn()
    except Exception as e:
        raise BadInputError(f"--data {spec} raised {type(e).__name__}: {e}") from None
    if not isinstance(data, Iterable):
        raise BadInputError(
            f"--data {spec} returned a {type(data).__name__}, not an iterable of batches"
        )
    return data


def load_data_spec(spec: str, *, batch_size: int = 32) -> Iterable[Any]:
    """Resolve ``--data SPEC`` into a re-iterable of batches of samples.

    Args:
        spec: see the module docstring. An array file holds samples stacked on the first
            axis; a ``.npz`` with several arrays yields dict batches (keyword inputs).
        batch_size: how many samples of an array file go into one batch.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in ARRAY_SUFFIXES)
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files and images:
            raise BadInputError(
                f"folder {spec} mixes array files and images; keep one kind per folder"
            )
        if images:
            return ImageBatches(images, batch_size)
        if not files:
            raise BadInputError(f"folder {spec} holds no .npy/.npz files and no images")
        return ArrayBatches(files, batch_size)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        if not path.is_file():
            raise BadInputError(f"data file {spec} does not exist")
        return ArrayBatches([path], batch_size)
    if is_function_spec(spec):
        return load_function_spec(spec)
    raise BadInputError(
        f"--data {spec!r} is neither a .npy/.npz file, a folder of them or of images, nor "
        "module:function"
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageBatches:
    """Re-iterable batches of images from a folder, decoded lazily one batch at a time."""

    def __init__(self, files: list[Path], batch_size: int) -> None:
        if batch_size <= 0:
            raise BadInputError(f"batch size must be positive, got {batch_size}")
        try:
            from PIL import Image
        except ImportError:
            raise BadInputError(
                "reading images needs Pillow: pip install pillow (or bnfold[images])"
            ) from None
        self._image = Image
        self.files = files
        self.batch_size = batch_size
        self.gray = all(self._open(f).mode in ("1", "L", "I;16") for f in files[:64])

    def _open(self, path: Path) -> Any:
        try:
            img = self._image.open(path)
            img.load()
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for broken files
            raise BadInputError(f"cannot read image {path}: {e}") from None
        return img

    def _sample(self, path: Path) -> np.ndarray:
        img = self._open(path).convert("L" if self.gray else "RGB")
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def __iter__(self) -> Iterator[np.ndarray]:
        shape: tuple[int, ...] | None = None
        for start in range(0, len(self.files), self.batch_size):
            chunk = self.files[start : start + self.batch_size]
            samples = [self._sample(f) for f in chunk]
            for f, x in zip(chunk, samples, strict=True):
                if shape is None:
                    shape, first = x.shape, f
                elif x.shape != shape:
                    raise BadInputError(
                        f"image {f.name} is {x.shape[2]}x{x.shape[1]} but {first.name} is "
                        f"{shape[2]}x{shape[1]}; resize the images to the model's input size "
                        "first (bnfold does not resize)"
                    )
            yield np.stack(samples)


class FullBatches:
    """Re-iterable view of file batches that drops a short last batch.

    For a model whose batch size is fixed: a short batch cannot run, and padding it would
    add made-up samples to the statistics, so it is left out; ``dropped`` says how many
    samples the last pass left out.
    """

    def __init__(self, data: Iterable[Any], size: int) -> None:
        self.data, self.size, self.dropped = data, size, 0

    def __iter__(self) -> Iterator[Any]:
        self.dropped = 0
        for batch in self.data:
            first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
            n = len(first)
            if n == self.size:
                yield batch
            else:
                self.dropped += n


class ArrayBatches:
    """Re-iterable batches of samples over array files, read lazily one file at a time."""

    def __init__(self, files: list[Path], batch_size: int) -> None:
        if batch_size <= 0:
            raise BadInputError(f"batch size must be positive, got {batch_size}")
        self.files = files
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Any]:
        step = self.batch_size
        for f in self.files:
            arr = read_array_file(f)
            if isinstance(arr, dict):
                if len(arr) == 1:
                    arr = next(iter(arr.values()))  # one array: a stack of samples
                else:
                    n = min(int(v.shape[0]) for v in arr.values())
                    for i in range(0, n, step):
                        yield {k: v[i : i + step] for k, v in arr.items()}
                    continue
            for i in range(0, int(arr.shape[0]), step):
                yield arr[i : i + step]
