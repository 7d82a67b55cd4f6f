"""Progress of the passes over the data: a bar on a terminal, a plain line per pass elsewhere.

The number of batches is unknown before the first pass (``len()`` is never used), so the first
pass counts up; every later pass knows its total from the first and shows a time estimate. When
stderr is not a terminal (a CI log, a pipe) a bar would either vanish or flood the log, so each
pass prints one line when it ends instead.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

__all__ = ["PassProgress"]


class PassProgress:
    """``add_task`` / ``advance`` / ``remove_task`` for one pass at a time, as both drivers use."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = Console(stderr=True)
        self.plain = enabled and not self._console.is_terminal
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=True,
            disable=not enabled or self.plain,
        )
        self._batches_per_pass: int | None = None
        self._started: dict[Any, tuple[str, float]] = {}
        self._done: dict[Any, int] = {}

    def __enter__(self) -> PassProgress:
        self._bar.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.__exit__(kind, value, tb)

    def add_task(self, description: str, total: int | None = None) -> Any:
        """Start a pass; ``total`` defaults to the number of batches the first pass saw."""
        task = self._bar.add_task(description, total=total or self._batches_per_pass)
        self._started[task] = (description, time.perf_counter())
        self._done[task] = 0
        return task

    def advance(self, task: Any) -> None:
        self._done[task] += 1
        self._bar.advance(task)

    def remove_task(self, task: Any) -> None:
        """End a pass (also when it failed): remembers its batch count, prints the plain line."""
        description, t0 = self._started.pop(task)
        done = self._done.pop(task)
        self._bar.remove_task(task)
        if self._batches_per_pass is None and done:
            self._batches_per_pass = done
        if self.plain:
            self._console.print(
                f"{description}: {done} batch(es) in {time.perf_counter() - t0:.2f} s",
                highlight=False,
                soft_wrap=True,
            )
