"""What every command shares: exit codes, one-line errors, rich output.

Exit codes (documented in the README):
    0  success (verify: every check passed)
    1  verification failed
    2  bad input (missing/corrupt file, bad argument, unwritable output)
    3  a requested execution provider could not run (verify)
    4  the model cannot be processed (unsupported model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PROVIDER = 3
EXIT_UNSUPPORTED = 4

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

T = TypeVar("T")

#: ``--allow-pickle``, the same opt-in wherever a command loads a torch model file.
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Accept a pickled whole-module PyTorch file (torch.save(model)). Unpickling runs "
        "arbitrary code from the file: use only for files you trust.",
    ),
]
#: ``--quiet``/``-q`` for commands that show progress bars.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` on one line to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise SystemExit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn bnfold's errors (and a few OS ones) into one line and an exit code."""
    from bnfold.errors import (
        BadInputError,
        BnfoldError,
        ProviderUnavailableError,
        UnsupportedModelError,
        VerificationError,
    )

    try:
        return fn()
    except ProviderUnavailableError as e:
        fail(str(e), EXIT_PROVIDER)
    except VerificationError as e:
        fail(str(e), EXIT_FAILED)
    except UnsupportedModelError as e:
        fail(str(e), EXIT_UNSUPPORTED)
    except (BadInputError, BnfoldError) as e:
        fail(str(e), EXIT_BAD_INPUT)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        fail(f"{e.strerror}: {e.filename}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted; no output was written", 130)
    raise AssertionError("unreachable")  # pragma: no cover
