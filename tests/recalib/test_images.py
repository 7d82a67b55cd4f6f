"""``--data FOLDER`` of images: decoded, scaled to [0, 1], batched, and recalibrated from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli.app import app
from bnfold.data import load_data_spec
from bnfold.errors import BadInputError

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (bnfold[images])")


def _images(folder: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> list[np.ndarray]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i, (w, h) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        suffix = ".png" if i % 2 == 0 else ".bmp"  # lossless, so the pixels can be compared
        Image.fromarray(arr, mode).save(folder / f"img{i:02d}{suffix}")
        arrays.append(arr)
    return arrays


def test_images_become_scaled_chw_float_batches(tmp_path: Path) -> None:
    arrays = _images(tmp_path / "imgs", [(32, 32)] * 5)
    batches = list(load_data_spec(str(tmp_path / "imgs"), batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    first = batches[0][0]
    assert first.dtype == np.float32 and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, arrays[0].transpose(2, 0, 1) / np.float32(255))


def test_grayscale_images_have_one_channel(tmp_path: Path) -> None:
    _images(tmp_path / "gray", [(16, 16)] * 3, mode="L")
    (batch,) = list(load_data_spec(str(tmp_path / "gray"), batch_size=4))
    assert batch.shape == (3, 1, 16, 16)


def test_cli_recalibrates_from_a_folder_of_png_and_jpeg(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _images(folder, [(32, 32)] * 6)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "z.jpg")
    out = tmp_path / "recal.pt"
    args = ["recalibrate", "resnet-mini", "--data", str(folder), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    state = torch.load(out, weights_only=True)
    assert int(state["stem.1.num_batches_tracked"]) == 2  # 7 images in batches of 4


def test_images_of_different_sizes_are_one_line(tmp_path: Path) -> None:
    _images(tmp_path / "mixed", [(32, 32), (24, 32)])
    out = tmp_path / "r.pt"
    args = ["recalibrate", "resnet-mini", "--data", str(tmp_path / "mixed"), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 2 and "resize the images" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3 and not out.exists()


def test_a_broken_image_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    _images(folder, [(32, 32)])
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadInputError, match=r"cannot read image .*bad\.png"):
        list(load_data_spec(str(folder)))
