"""Writing: a full disk, a file size limit, a signal mid-write, clashing or impossible output
paths and replaced files. Every case leaves no output, no temporary file and the inputs as
they were, or (for a replaced file) the file's own permission bits."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from .hostile import assert_refused, run
from .test_invalid_onnx import conv_bn


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(conv_bn(), str(src))
    return src


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "calib.npy"
    path.parent.mkdir(exist_ok=True)
    np.save(path, np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path


def _cli(
    args: list[str], *, fsize: int | None = None, prelude: str = ""
) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process, optionally under a file size limit."""
    code = f"import sys\n{prelude}\nfrom bnfold.cli.app import main\nsys.argv = ['bnfold', *{args!r}]\nmain()"

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def _clean(proc: subprocess.CompletedProcess, code: int, folder: Path, expect: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert expect in proc.stderr, proc.stderr
    assert list(folder.iterdir()) == [], sorted(p.name for p in folder.iterdir())


def test_file_size_limit_while_folding(model_file: Path, out_dir: Path) -> None:
    """EFBIG from the kernel (RLIMIT_FSIZE) while the model is written."""
    size = model_file.stat().st_size
    proc = _cli(["fold", str(model_file), "-o", str(out_dir / "f.onnx")], fsize=size // 2)
    _clean(proc, 2, out_dir, "File too large")


def test_file_size_limit_while_writing_a_torch_archive(calib: Path, out_dir: Path) -> None:
    """torch's archive writer reports the same limit as a RuntimeError: still one line."""
    args = ["recalibrate", "resnet-mini", "--data", str(calib), "-o", str(out_dir / "r.pt")]
    _clean(_cli([*args, "--no-progress"], fsize=16 * 1024), 2, out_dir, "cannot write")


def test_full_disk_while_writing_the_json_leaves_no_model(
    model_file: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON is written after the model: the model must not be left on its own."""

    def full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out, report = out_dir / "f.onnx", out_dir / "f.json"
    outcome = assert_refused(
        ["fold", model_file, "-o", out, "--json", report],
        2,
        outputs=[out, report],
        inputs=[model_file],
        match="No space left",
    )
    assert "cannot write" in outcome.stderr


def test_full_disk_while_recalibrating_onnx(
    model_file: Path, calib: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfold.onnx_io

    def full(path: Path, data: bytes, chunk: int = 0) -> None:
        Path(path).write_bytes(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(bnfold.onnx_io, "write_bytes", full)
    out = out_dir / "r.onnx"
    args = [
        "recalibrate",
        model_file,
        "--data",
        calib,
        "-o",
        out,
        "--batch-size",
        "1",
        "--no-progress",
    ]
    assert_refused(args, 2, outputs=[out], inputs=[model_file, calib], match="No space left")


SIGNAL_PRELUDE = """
import os, signal
import bnfold.onnx_io as io
_write = io.write_bytes
def write_then_die(path, data, chunk=1 << 24):
    with open(path, 'wb') as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.{sig})
    _write(path, data, chunk)
io.write_bytes = write_then_die
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_write_leaves_no_temporary_file(model_file: Path, out_dir: Path, sig: str):
    proc = _cli(
        ["fold", str(model_file), "-o", str(out_dir / "f.onnx")],
        prelude=SIGNAL_PRELUDE.format(sig=sig),
    )
    code = 128 + signal.SIGTERM if sig == "SIGTERM" else 130
    _clean(proc, code, out_dir, "no output was written")


def test_replacing_a_file_keeps_its_mode(model_file: Path, out_dir: Path) -> None:
    out, report = out_dir / "f.onnx", out_dir / "f.json"
    for path in (out, report):
        path.write_text("old")
        path.chmod(0o600)
    assert run(["fold", model_file, "-o", out, "--json", report]).code == 0
    assert onnx.load(str(out)).graph.node
    assert (out.stat().st_mode & 0o777, report.stat().st_mode & 0o777) == (0o600, 0o600)


def test_a_new_file_gets_the_umask_mode(model_file: Path, out_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        assert run(["fold", model_file, "-o", out_dir / "f.onnx"]).code == 0
    finally:
        os.umask(old)
    assert (out_dir / "f.onnx").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("command", ["fold", "recalibrate", "export"])
def test_json_path_equal_to_the_output_is_refused(
    command: str, model_file: Path, calib: Path, out_dir: Path
) -> None:
    out = out_dir / "same.onnx"
    args = {
        "fold": ["fold", model_file, "-o", out, "--json", out],
        "recalibrate": ["recalibrate", model_file, "--data", calib, "-o", out, "--json", out],
        "export": ["export", "resnet-mini", "-o", out, "--json", out, "-q"],
    }[command]
    assert_refused(args, 2, outputs=[out], inputs=[model_file], match="same.onnx")


@pytest.mark.parametrize("command", ["fold", "recalibrate", "export", "verify"])
def test_json_in_a_missing_folder_is_refused_before_any_write(
    command: str, model_file: Path, calib: Path, out_dir: Path
) -> None:
    out, report = out_dir / "m.onnx", out_dir / "missing" / "r.json"
    args = {
        "fold": ["fold", model_file, "-o", out, "--json", report],
        "recalibrate": ["recalibrate", model_file, "--data", calib, "-o", out, "--json", report],
        "export": ["export", "resnet-mini", "-o", out, "--json", report, "-q"],
        "verify": ["verify", model_file, model_file, "--json", report, "-q"],
    }[command]
    assert_refused(args, 2, outputs=[out], inputs=[model_file], match="does not exist")


def test_recalibrated_torch_state_dict_is_written_atomically(calib: Path, out_dir: Path) -> None:
    """Control case for the limits above: without one, the same command writes its output."""
    out = out_dir / "r.pt"
    assert (
        run(["recalibrate", "resnet-mini", "--data", calib, "-o", out, "--no-progress"]).code == 0
    )
    assert isinstance(torch.load(out, weights_only=True), dict)
    assert sorted(p.name for p in out_dir.iterdir()) == ["r.pt"]
