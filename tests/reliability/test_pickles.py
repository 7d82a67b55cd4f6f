"""Security: a crafted ``.pt2`` archive runs no code, whichever command or API loads it.

Each hostile archive is a real ``torch.export.save`` file with one entry replaced: a pickle
whose ``__reduce__`` would create a marker file, a payload marked ``use_pickle``, a graph node
calling ``os.system`` through ``torch.os``, or a symbolic expression that ``sympy.sympify``
would evaluate. The marker must never appear, and the refusal names the entry.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold.errors import BadInputError
from bnfold.torchfold.load import load_torch
from bnfold.torchfold.pt2_safety import check_pt2_archive

from .hostile import assert_refused, digest


class _Payload:
    """Unpickling this object runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


Edit = Callable[[dict[str, bytes], bytes], None]


def _entry(items: dict[str, bytes], part: str) -> str:
    return next(name for name in items if part in name)


def _sample_inputs(items: dict[str, bytes], evil: bytes) -> None:
    items[_entry(items, "data/sample_inputs/")] = evil


def _use_pickle_weight(items: dict[str, bytes], evil: bytes) -> None:
    config_name = _entry(items, "weights_config.json")
    config = json.loads(items[config_name])
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    items[config_name] = json.dumps(config).encode()
    items[config_name.rsplit("/", 1)[0] + "/" + meta["path_name"]] = evil


def _legacy_weights_file(items: dict[str, bytes], evil: bytes) -> None:
    root = next(iter(items)).split("/", 1)[0]
    items[f"{root}/data/weights/model.pt"] = evil


def _opaque_constant(items: dict[str, bytes], evil: bytes) -> None:
    name = _entry(items, "constants_config.json")
    items[name.rsplit("/", 1)[0] + "/opaque_obj_0"] = evil


def _call_target(items: dict[str, bytes], evil: bytes) -> None:
    name = _entry(items, "/models/")
    text = items[name].decode()
    assert '"torch.ops.aten.relu.default"' in text
    items[name] = text.replace('"torch.ops.aten.relu.default"', '"torch.os.system"', 1).encode()


def _sympy_expression(items: dict[str, bytes], evil: bytes) -> None:
    name = _entry(items, "/models/")
    program = json.loads(items[name])
    program["graph_module"]["graph"]["sym_int_values"] = {
        "s0": {"as_expr": {"expr_str": "__import__('os').system('true')", "hint": None}}
    }
    items[name] = json.dumps(program).encode()


def _aoti_library(items: dict[str, bytes], evil: bytes) -> None:
    root = next(iter(items)).split("/", 1)[0]
    items[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"


EDITS: dict[str, tuple[Edit, str]] = {
    "sample-inputs": (_sample_inputs, "data/sample_inputs/model.pt"),
    "use-pickle-weight": (_use_pickle_weight, "data/weights/weight_0"),
    "legacy-weights-file": (_legacy_weights_file, "data/weights/model.pt"),
    "opaque-constant": (_opaque_constant, "opaque_obj_0"),
    "call-target": (_call_target, "torch.os.system"),
    "sympy-expression": (_sympy_expression, "__import__"),
    "aoti-library": (_aoti_library, "model.so"),
}


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(path))
    return path


def _hostile(good: Path, folder: Path, kind: str, protocol: int = 2) -> tuple[Path, Path]:
    marker = folder / f"MARKER-{kind}"
    evil = pickle.dumps(_Payload(marker), protocol=protocol)
    with zipfile.ZipFile(good) as archive:
        items = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    EDITS[kind][0](items, evil)
    path = folder / f"{kind}.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in items.items():
            archive.writestr(name, data)
    return path, marker


def test_a_plain_archive_passes_the_inspection(good_archive: Path) -> None:
    check_pt2_archive(good_archive)
    program, example = load_torch(str(good_archive))
    assert isinstance(program, torch.export.ExportedProgram) and example is not None


def test_dynamic_shapes_pass_the_inspection(tmp_path: Path) -> None:
    """Real symbolic expressions (srepr of Symbol/Add/Max ...) are arithmetic, not refused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    batch, side = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("side", min=4)
    program = torch.export.export(
        model, (torch.randn(4, 3, 9, 9),), dynamic_shapes=({0: batch, 2: side, 3: side},)
    )
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, str(path))
    assert "expr_str" in zipfile.ZipFile(path).read("dynamic/models/model.json").decode()
    loaded, _ = load_torch(str(path))
    assert loaded.range_constraints


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_hostile_archive_is_refused_by_the_api(good_archive: Path, tmp_path: Path, kind: str):
    path, marker = _hostile(good_archive, tmp_path, kind)
    with pytest.raises(BadInputError, match="refused") as caught:
        load_torch(str(path))
    assert EDITS[kind][1] in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_protocol_0_pickle_is_refused_too(good_archive: Path, tmp_path: Path) -> None:
    """A text pickle has no 0x80 header; the check goes by what torch loads, not by bytes."""
    path, marker = _hostile(good_archive, tmp_path, "sample-inputs", protocol=0)
    with pytest.raises(BadInputError, match="weights-only pickle"):
        load_torch(str(path))
    assert not marker.exists()


def test_torch_itself_runs_the_pickle(good_archive: Path, tmp_path: Path) -> None:
    """The threat is real: without bnfold's check torch.export.load runs the payload."""
    path, marker = _hostile(good_archive, tmp_path, "sample-inputs")
    with pytest.raises(Exception):  # noqa: B017 - torch fails after unpickling
        torch.export.load(str(path))
    assert marker.exists()


COMMANDS = {
    "fold": lambda src, out: ["fold", src, "-o", out],
    "verify": lambda src, out: ["verify", src, src, "--json", out],
    "export": lambda src, out: ["export", src, "-o", out],
    "recalibrate": lambda src, out: ["recalibrate", src, "--data", "x.npy", "-o", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["sample-inputs", "use-pickle-weight", "call-target"])
def test_hostile_archive_is_refused_by_every_command(
    good_archive: Path, tmp_path: Path, command: str, kind: str
) -> None:
    path, marker = _hostile(good_archive, tmp_path, kind)
    out = tmp_path / "out" / "result.bin"
    out.parent.mkdir()
    args = COMMANDS[command](str(path), str(out))
    if command == "recalibrate":
        data = tmp_path / "x.npy"
        import numpy as np

        np.save(data, np.zeros((2, 3, 8, 8), np.float32))
        args[args.index("x.npy")] = str(data)
    assert_refused(args, 2, outputs=[out], inputs=[path], match="is refused")
    assert not marker.exists()


def test_refusal_in_a_real_process(good_archive: Path, tmp_path: Path) -> None:
    """The installed entry point: exit 2, one line on stderr, the marker never created."""
    path, marker = _hostile(good_archive, tmp_path, "use-pickle-weight")
    before = digest(path)
    out = tmp_path / "folded.pt2"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold.cli.app", "fold", str(path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists() and digest(path) == before


def test_archive_bytes_that_are_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt2"
    path.write_bytes(io.BytesIO(b"PK\x03\x04 truncated").getvalue())
    with pytest.raises(BadInputError):
        load_torch(str(path))
