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


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind like Ctrl-C so that temporary files are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into :class:`Terminated`, raised in the main thread.

    Python's default for SIGTERM ends the process at once, skipping ``finally`` blocks, which
    would leave a half-written temporary output behind.
    """
    import signal

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn`` with all its outputs in one set (written together, or none); turn bnfold's
    errors, write failures and signals into one line and an exit code."""
    from bnfold.atomic import output_set
    from bnfold.errors import (
        BadInputError,
        BnfoldError,
        ProviderUnavailableError,
        UnsupportedModelError,
        VerificationError,
    )

    try:
        with output_set():
            return fn()
    except ProviderUnavailableError as e:
        fail(str(e), EXIT_PROVIDER)
    except VerificationError as e:
        fail(str(e), EXIT_FAILED)
    except UnsupportedModelError as e:
        fail(str(e), EXIT_UNSUPPORTED)
    except (BadInputError, BnfoldError) as e:
        fail(str(e), EXIT_BAD_INPUT)
    except OSError as e:  # a read or write the API did not anticipate
        where = f": {e.filename}" if e.filename else ""
        fail(f"{e.strerror or e}{where}; nothing was written", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted; no output was written", 130)
    except Terminated as e:
        fail(f"terminated by signal {e.signum}; no output was written", 128 + e.signum)
    raise AssertionError("unreachable")  # pragma: no cover
