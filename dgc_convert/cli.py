"""The ``dgc-convert`` command line: a thin Typer shell over the Python API."""

from __future__ import annotations

import typer

from dgc_convert import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Convert CNNs into Dynamic Group Convolution networks.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dgc-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Convert CNNs into Dynamic Group Convolution networks."""


def main() -> None:
    """Console-script entry point."""
    app()
