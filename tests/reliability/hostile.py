"""What every refusal must look like, checked the same way for every hostile input.

A refusal exits with the README's code, prints at most three lines on stderr and no
traceback, leaves no output and no temporary file in the output folder, and leaves the inputs
byte for byte as they were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from bnfold.cli.app import app

runner = CliRunner()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str


def run(args: Sequence[str]) -> Outcome:
    """Run the CLI in-process; an exception that escaped the command is a test failure."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    return Outcome(result.exit_code, result.stderr, result.stdout)


def assert_refused(
    args: Sequence[str],
    code: int,
    *,
    outputs: Sequence[Path] = (),
    inputs: Sequence[Path] = (),
    match: str | None = None,
) -> Outcome:
    """Run ``args`` and check every property of a clean refusal."""
    before = {p: digest(p) for p in inputs}
    folders = {p.parent for p in outputs}
    listing = {f: sorted(x.name for x in f.iterdir()) for f in folders if f.is_dir()}
    outcome = run(args)
    assert outcome.code == code, (outcome.code, outcome.stderr, outcome.stdout)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, outcome.stderr
    assert "Traceback" not in outcome.stderr + outcome.stdout
    if match is not None:
        assert match in " ".join(outcome.stderr.split()), outcome.stderr
    for out in outputs:
        assert not out.exists(), f"{out} was written"
    for folder, names in listing.items():
        assert sorted(x.name for x in folder.iterdir()) == names, "a temporary file was left"
    for p, d in before.items():
        assert digest(p) == d, f"{p} was changed"
    return outcome
