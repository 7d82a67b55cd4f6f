"""Write files so that a failed run leaves nothing behind, and a command's outputs go together.

Every output is written to a temporary sibling first and renamed into place only once complete,
so a crash, a full disk or a signal midway leaves the destination as it was and no temporary
file. A command that writes several files (a model and its JSON report, a model and its
external data) wraps its work in :func:`output_set`: inside it, :func:`atomic_path` only
stages each file, and the renames happen together once the whole command has succeeded; if
anything fails, nothing is renamed. Replacing an existing file keeps that file's permission
bits (a 0600 model stays 0600).

Write errors (``ENOSPC``, ``EFBIG``, ``EDQUOT``, torch's "file write failed") become a
one-line :class:`~bnfold.errors.BadInputError` naming the destination.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bnfold.errors import BadInputError

__all__ = ["atomic_path", "output_set", "write_text", "check_writable", "write_failure"]


def check_writable(path: Path, *, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output path that would overwrite an input or cannot be written."""
    path = Path(path)
    for src in inputs:
        if path.resolve() == Path(src).resolve():
            raise BadInputError(
                f"output {path} is the input file; choose another -o path (bnfold never "
                "overwrites its input)"
            )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise BadInputError(f"cannot write {path}: it is a folder; give a file name")
    return path


@dataclass
class _Staged:
    tmp: Path
    dest: Path


@dataclass
class OutputSet:
    """The files one command has written to temporary paths, renamed together on success."""

    staged: list[_Staged] = field(default_factory=list)

    def stage(self, dest: Path, suffix: str) -> Path:
        """A new temporary file next to ``dest``, to be renamed onto it at commit."""
        dest = Path(dest)
        for s in self.staged:
            if _same_path(s.dest, dest):
                raise BadInputError(
                    f"{dest} is given for two outputs of this command; choose distinct paths"
                )
        tmp = _temp_sibling(dest, suffix)
        self.staged.append(_Staged(tmp, dest))
        return tmp

    def drop(self, tmp: Path) -> None:
        """Give up one staged file (delete it; its destination stays as it was)."""
        self.staged = [s for s in self.staged if s.tmp != tmp]
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

    def commit(self) -> None:
        for s in self.staged:
            _keep_mode(s.tmp, s.dest)
        for s in self.staged:
            os.replace(s.tmp, s.dest)
        self.staged.clear()

    def discard(self) -> None:
        for s in self.staged:
            with contextlib.suppress(FileNotFoundError):
                s.tmp.unlink()
        self.staged.clear()


_ACTIVE: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar(
    "bnfold_output_set", default=None
)


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    """Group every :func:`atomic_path` inside the block: all renamed at the end, or none.

    Nested use joins the outer set, so an API function that writes atomically on its own
    becomes part of the command that calls it.
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    outputs = OutputSet()
    token = _ACTIVE.set(outputs)
    try:
        yield outputs
        outputs.commit()
    finally:
        _ACTIVE.reset(token)
        outputs.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` once all went well.

    Outside :func:`output_set` the rename happens when the block ends; inside one, when the
    set commits. The temporary file sits in the same folder, so the rename is atomic on POSIX.
    """
    dest = Path(path)
    with output_set() as outputs:
        tmp = outputs.stage(dest, suffix or dest.suffix or ".tmp")
        try:
            yield tmp
        except (OSError, RuntimeError) as e:
            failure = write_failure(e, dest)
            if failure is None:
                raise
            raise failure from None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


#: errno values that mean "the disk or a limit refused the bytes", not a bug.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES}


def write_failure(error: BaseException, dest: Path) -> BadInputError | None:
    """The one-line error for a failed write of ``dest``, or None when it is not one.

    torch's archive writer reports a full disk or a size limit as a ``RuntimeError``
    ("file write failed", "iostream error", "unexpected pos ..."); inside an atomic write
    block nothing but writing happens, so any RuntimeError there is a failed write.
    """
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return BadInputError(
            f"cannot write {dest}: {error.strerror or error}; nothing was written (free space "
            "or raise the file size limit)"
        )
    if isinstance(error, RuntimeError):
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return BadInputError(f"cannot write {dest}: {lines[0][:160]}; nothing was written")
    return None


def _temp_sibling(dest: Path, suffix: str) -> Path:
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=folder)
    except OSError as e:
        raise write_failure(e, dest) or BadInputError(f"cannot write {dest}: {e}") from None
    os.close(fd)
    # mkstemp creates 0600; give the file the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _keep_mode(tmp: Path, dest: Path) -> None:
    """A file that replaces an existing one keeps its permission bits."""
    try:
        mode = stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (
        a.exists() and b.exists() and os.path.samefile(a, b)
    )
