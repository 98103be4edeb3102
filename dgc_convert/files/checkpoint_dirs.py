"""Which directory a checkpoint name stands for, while a save may be swapping it.

A save writes the new checkpoint beside the old one and swaps them by two renames; the old one
waits under ``set_aside(name)`` meanwhile. Every reader (``--resume``, ``load``, ``eval``) asks
``find_checkpoint``, so a save cut between the renames still leaves one complete checkpoint found.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dgc_convert.files.names import STATE_FILE

__all__ = ["find_checkpoint", "recover", "set_aside"]


def set_aside(directory: Path) -> Path:
    """Where a save moves the previous checkpoint while the new one takes its name."""
    return directory.with_name(f".{directory.name}.old")


def recover(directory: Path) -> None:
    """Put back the checkpoint a save set aside, when it died before the new one took the name."""
    previous = set_aside(directory)
    if not (directory / STATE_FILE).is_file() and (previous / STATE_FILE).is_file():
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(previous, directory)


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at ``directory`` (or the one a save in progress set aside), or None.

    The one place that decides which checkpoint a name stands for: ``--resume``,
    ``read_checkpoint``, ``dgc_convert.load`` and ``dgc-convert eval`` all ask it.
    """
    directory = Path(directory)
    for candidate in (directory, set_aside(directory)):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None
