"""The ``dgc-convert`` command line.

``app`` is the Typer application and ``main`` the console-script entry point (both from
``cli.app``). One module per command or command group (``convert_command``, ``recipe_commands``,
``train_command``, ...), the options they share declared once (``options``), how a command ends
(``exits``), and what a person reads (``render``). Importing this package imports no torch.
"""

from dgc_convert.cli.app import app, main

__all__ = ["app", "main"]
