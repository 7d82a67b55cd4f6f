"""Loading refuses what is not an ONNX model; saving is atomic and leaves inputs alone."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxfold_util import bn_inputs, bn_params, model

import bnfold.onnx_io
from bnfold.errors import BadInputError
from bnfold.onnx_io import check_output_path, load_onnx, load_onnx_info, save_onnx
from bnfold.onnxfold import fold_file, fold_onnx


@pytest.fixture
def small(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    m = model(
        f"""g (float[N,3,8,8] x) => (float[N,16,6,6] y) {{
            c = Conv(x, w)
            y = BatchNormalization(c, {bn_inputs("bn")})
        }}""",
        {"w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32), **bn_params("bn", 16, rng)},
    )
    path = tmp_path / "small.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an ONNX model"),
        (b"definitely not a protobuf \xff\xfe\x00", "not an ONNX model"),
        (b"\x0a\x05hello", "not an ONNX model"),  # parses, but has no graph or opset
    ],
    ids=["empty", "garbage", "no-graph"],
)
def test_not_onnx(tmp_path, content, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        load_onnx(bad)


def test_truncated(small, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
    with pytest.raises(BadInputError, match="not an ONNX model"):
        load_onnx(cut)


def test_missing_and_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    with pytest.raises(BadInputError, match="folder"):
        load_onnx(tmp_path)


def test_missing_external_data(small, tmp_path):
    m = onnx.load(str(small))
    dst = tmp_path / "ext.onnx"
    save_onnx(m, dst, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(BadInputError, match="external data"):
        load_onnx(dst)


def test_output_checks(small, tmp_path):
    with pytest.raises(BadInputError, match="is the input"):
        check_output_path(small, small)
    with pytest.raises(BadInputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "such" / "out.onnx", small)


def test_unwritable_folder(small, tmp_path, monkeypatch):
    """A folder the user cannot write to is refused before any work (os.access is faked so the
    test also holds when run as root, who may write anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode)
    )
    with pytest.raises(BadInputError, match="not writable"):
        fold_file(small, ro / "out.onnx")
    assert not list(ro.iterdir())


def test_failed_save_leaves_nothing(small, tmp_path, monkeypatch):
    m = onnx.load(str(small))
    dst = tmp_path / "out.onnx"

    def full_disk(path, data, chunk=0):
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(bnfold.onnx_io, "write_bytes", full_disk)
    with pytest.raises(BadInputError, match=r"cannot write .*out.onnx: No space left"):
        save_onnx(m, dst)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]


def test_save_external_keeps_model_in_memory(small, tmp_path):
    m = onnx.load(str(small))
    before = m.SerializeToString()
    save_onnx(m, tmp_path / "e.onnx", external_data=True)
    assert m.SerializeToString() == before
    assert load_onnx_info(tmp_path / "e.onnx").external_data


def test_fold_file_leaves_input(small, tmp_path):
    before = small.read_bytes()
    report = fold_file(small, tmp_path / "out.onnx")
    assert small.read_bytes() == before
    assert len(report.folded) == 1 and report.model == str(small)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fold_onnx_accepts_path_and_rejects_other_types(small):
    folded, report = fold_onnx(small)
    assert len(report.folded) == 1
    with pytest.raises(BadInputError, match="ModelProto"):
        fold_onnx(42)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="direction"):
        fold_onnx(folded, direction="sideways")


def test_inplace(small):
    m = onnx.load(str(small))
    folded, _ = fold_onnx(m, inplace=True)
    assert folded is m and not any(n.op_type == "BatchNormalization" for n in m.graph.node)
