"""The ``dgc-convert`` command line: a thin Typer shell over the Python API.

``dgc-convert MODEL [options]`` converts a model and reports the MAC saving;
subcommands (``list-models``, ``recipe``, ``train``, ...) sit beside it, one
module each. Every command parses options, calls the API and hands the result
to ``render``. Bad input is one line on stderr and exit code 2, never a
traceback (``exits``).

Nothing here or in the command modules imports torch, torchvision or timm at
import time: ``--help`` and ``--version`` answer at once, and each command
imports what it uses when it runs.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from dgc_convert._version import __version__
from dgc_convert.cli.bench_command import BENCH_HELP, bench_command
from dgc_convert.cli.convert_command import CONVERT_HELP, convert_command
from dgc_convert.cli.evaluate_commands import EVAL_HELP, INSPECT_HELP, eval_command, inspect_command
from dgc_convert.cli.exits import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_RUN_FAILED, handles_errors, os_error_exit
from dgc_convert.cli.export_command import EXPORT_HELP, export_command
from dgc_convert.cli.import_authors import IMPORT_AUTHORS_HELP, import_authors_command
from dgc_convert.cli.models_command import LIST_MODELS_HELP, list_models_command
from dgc_convert.cli.plot_command import PLOT_HELP, plot_command
from dgc_convert.cli.recipe_commands import recipe_app
from dgc_convert.cli.train_command import TRAIN_HELP, train_command

__all__ = ["app", "main", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED", "EXIT_INTERRUPTED", "handles_errors", "os_error_exit"]


class _DefaultToConvert(TyperGroup):
    """Route ``dgc-convert MODEL ...`` to the ``convert`` command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's vendored click Context has no public name
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultToConvert,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert timm and torchvision CNNs into Dynamic Group Convolution networks.\n\n"
    "Run `dgc-convert MODEL --heads 4 --zeta 0.5` to convert a model and see the MAC saving.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dgc-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Convert timm and torchvision CNNs into Dynamic Group Convolution networks."""


# The commands, in the order --help lists them (each is wrapped in handles_errors where it is defined).
app.command("convert", help=CONVERT_HELP)(convert_command)
app.command("list-models", help=LIST_MODELS_HELP)(list_models_command)
app.add_typer(recipe_app, name="recipe")
app.command("train", help=TRAIN_HELP)(train_command)
app.command("bench", help=BENCH_HELP)(bench_command)
app.command("plot", help=PLOT_HELP)(plot_command)
app.command("eval", help=EVAL_HELP)(eval_command)
app.command("inspect", help=INSPECT_HELP)(inspect_command)
app.command("export", help=EXPORT_HELP)(export_command)
app.command("import-authors", help=IMPORT_AUTHORS_HELP)(import_authors_command)


def main() -> None:
    """Console-script entry point (``dgc-convert`` and ``python -m dgc_convert.cli``)."""
    app()


if __name__ == "__main__":
    main()
