"""The Typer application. Each command lives in its own module and only parses, calls the
API and renders; heavy imports happen inside the commands so ``bnfold --help`` is instant."""

from __future__ import annotations

import typer

from bnfold.cli import export as export_cmd
from bnfold.cli import fold as fold_cmd
from bnfold.cli import recalibrate as recalibrate_cmd
from bnfold.cli import verify as verify_cmd

app = typer.Typer(
    name="bnfold",
    help="Fold BatchNorm into neighbouring layers exactly; recalibrate, verify and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Markdown mode re-wraps docstring paragraphs to the terminal instead of keeping line breaks.
    rich_markup_mode="markdown",
)

app.command("export")(export_cmd.export)
app.command("fold")(fold_cmd.fold)
app.command("recalibrate")(recalibrate_cmd.recalibrate)
app.command("verify")(verify_cmd.verify)


def main() -> None:
    from bnfold.cli.common import install_signal_handlers

    install_signal_handlers()
    app()


if __name__ == "__main__":
    main()
