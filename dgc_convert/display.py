"""How the library's optional displays look: rich consoles, the step progress line, MAC figures.

Nothing here prints by itself: ``StepProgress`` is a ``progress.Progress`` a caller hands in,
and the consoles are where it (and the CLI) write.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # rich.progress loads when a bar is first shown
    from rich.progress import Progress, TaskID

__all__ = ["StepProgress", "error_console", "format_macs", "output_console"]


def format_macs(macs: float) -> str:
    """A MAC count with a unit: 1.82 G, 549.3 M, 12.0 K."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


def error_console() -> Console:
    """A console on stderr for one-line errors."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def output_console() -> Console:
    """A console on stdout; wide when writing to a file or pipe, so tables do not wrap."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class StepProgress:
    """A long command's steps as one transient rich line on stderr: a spinner, the
    step, a bar with done/total where the step counts its work, and the time spent.

    Shown only when stderr is a terminal (stdout may carry JSON, and logs stay
    clean); it disappears when the command ends, leaving only the result. Use it
    as a context manager and pass it as ``progress=`` (see ``dgc_convert.progress``).
    """

    def __init__(self, console: Console | None = None, *, show: bool | None = None) -> None:
        self.console = console or error_console()
        self.show = self.console.is_terminal if show is None else show
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.done = 0  # units of the current step
        self.total: int | None = None

    def __enter__(self) -> StepProgress:
        if self.show:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),  # paths may hold brackets
                BarColumn(),
                TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.task, self.done, self.total = None, 0, None  # ready to be entered again

    def step(self, description: str, total: int | None = None) -> None:
        """Show ``description`` in place of the previous step; a bar when ``total`` is known."""
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.done, self.total = 0, total
        # An uncounted step shows a pulsing bar and no count.
        self.task = self.progress.add_task(description, total=total, count=self._count())

    def advance(self, amount: int = 1) -> None:
        """Move the current step's bar on."""
        if self.progress is not None and self.task is not None:
            self.done += amount
            self.progress.update(self.task, advance=amount, count=self._count())

    def _count(self) -> str:
        return "" if self.total is None else f"{self.done}/{self.total}"
