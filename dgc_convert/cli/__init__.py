"""The ``dgc-convert`` command line: the Typer app, its rendering, and the conversion summary.

``app`` is the Typer application; ``main`` is the console-script entry point.
"""

from dgc_convert.cli.app import app, main

__all__ = ["app", "main"]
