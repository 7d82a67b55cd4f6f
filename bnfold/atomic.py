"""Write files so that a failed run leaves nothing behind.

Outputs go to a temporary sibling first and are renamed into place only once complete; a crash
or an error midway leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnfold.errors import BadInputError

__all__ = ["atomic_path", "write_text", "check_writable"]


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file sits in the same folder so the rename is atomic on POSIX.
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=suffix or dest.suffix or ".tmp", dir=dest.parent or "."
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the file the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
