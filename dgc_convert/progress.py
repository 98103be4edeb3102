"""Progress of long library calls (evaluating, exporting, benchmarking, ...).

The library never prints. A long call takes ``progress=``, an object with two
methods, and tells it which step it is on and how far that step has got; the
CLI hands in rich bars on a terminal (``dgc_convert.display.StepProgress``),
and the default, ``NO_PROGRESS``, does nothing. Training has its own, richer
reporter (``training.events.TrainCallback``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["NO_PROGRESS", "Progress", "tracked"]

Item = TypeVar("Item")


class Progress(Protocol):
    """Receives the steps of a long call, in order."""

    def step(self, description: str, total: int | None = None) -> None:
        """A new step begins (the previous one is over); ``total``: its units of work
        (batches, timed runs) when they are known, else None."""
        ...

    def advance(self, amount: int = 1) -> None:
        """``amount`` more units of the current step are done."""
        ...


class _NoProgress:
    """Ignores everything: the default wherever ``progress`` is not given."""

    def step(self, description: str, total: int | None = None) -> None:
        """Ignored."""

    def advance(self, amount: int = 1) -> None:
        """Ignored."""


NO_PROGRESS: Progress = _NoProgress()


def tracked(items: Iterable[Item], progress: Progress, description: str, total: int | None = None) -> Iterator[Item]:
    """Yield ``items`` as one step of ``progress``, advancing by one per item.

    ``total`` defaults to ``len(items)`` where it has one (a DataLoader does).
    """
    if total is None:
        try:  # a DataLoader over a streaming data set has __len__ but no length
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress.step(description, total)
    for item in items:
        yield item
        progress.advance()
