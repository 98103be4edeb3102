"""The caller's reporter and callbacks, turned once per run into objects the trainer calls directly.

A reporter that subclasses ``TrainCallback`` is used as it is. Any other
object is the documented duck-typed reporter: ``as_reporter`` looks its
``on_*`` methods up once, when the run starts, and wraps it so that every
event is a plain method call (an event it has no method for does nothing);
an object with none of them is refused in one line, since it would silently
hear nothing. Callbacks (``on_iteration_end`` / ``on_epoch_end``, called on
every rank) are bound the same way by ``Callbacks.of``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dgc_convert.training.events import EpochMetrics, IterationStats, RunInfo, TrainCallback, TrainControl, TrainResult

__all__ = ["REPORTER_EVENTS", "Callbacks", "DuckReporter", "as_reporter", "message_sink"]

# The events a reporter may handle (TrainCallback's methods; close is its owner's business).
REPORTER_EVENTS = ("on_start", "on_iteration", "on_epoch", "on_message", "on_finish")
CALLBACK_EVENTS = ("on_iteration_end", "on_epoch_end")


def _method(target: object, name: str) -> Callable[..., Any] | None:
    """``target``'s callable attribute ``name``, or None."""
    found = getattr(target, name, None)
    return found if callable(found) else None


class DuckReporter(TrainCallback):
    """A reporter that does not subclass ``TrainCallback``, adapted: its ``on_*`` methods are
    looked up once, here, and each event calls the one it has (the others do nothing).

    Raises:
        TypeError: ``target`` has none of the reporter methods (one line).
    """

    def __init__(self, target: object) -> None:
        self.target = target
        self._start: Callable[[RunInfo], Any] | None = _method(target, "on_start")
        self._iteration: Callable[[IterationStats], Any] | None = _method(target, "on_iteration")
        self._epoch: Callable[[EpochMetrics], Any] | None = _method(target, "on_epoch")
        self.message: Callable[[str], Any] | None = _method(target, "on_message")
        self._finish: Callable[[TrainResult], Any] | None = _method(target, "on_finish")
        if not any((self._start, self._iteration, self._epoch, self.message, self._finish)):
            raise TypeError(
                f"reporter {type(target).__name__} has none of {', '.join(REPORTER_EVENTS)}: "
                "subclass dgc_convert.TrainCallback or define the events it should receive"
            )

    def on_start(self, info: RunInfo) -> None:
        """Passed on to the target's ``on_start``, if it has one."""
        if self._start is not None:
            self._start(info)

    def on_iteration(self, stats: IterationStats) -> None:
        """Passed on to the target's ``on_iteration``, if it has one."""
        if self._iteration is not None:
            self._iteration(stats)

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """Passed on to the target's ``on_epoch``, if it has one."""
        if self._epoch is not None:
            self._epoch(metrics)

    def on_message(self, text: str) -> None:
        """Passed on to the target's ``on_message``, if it has one."""
        if self.message is not None:
            self.message(text)

    def on_finish(self, result: TrainResult) -> None:
        """Passed on to the target's ``on_finish``, if it has one."""
        if self._finish is not None:
            self._finish(result)


def as_reporter(reporter: object | None) -> TrainCallback:
    """``reporter`` as a ``TrainCallback``: itself when it is one, a ``DuckReporter`` around any
    other object, a silent ``TrainCallback()`` for None (so the trainer never checks for None).

    Raises:
        TypeError: an object with none of the reporter methods (one line).
    """
    if reporter is None:
        return TrainCallback()
    if isinstance(reporter, TrainCallback):
        return reporter
    return DuckReporter(reporter)


def message_sink(reporter: TrainCallback) -> Callable[[str], Any] | None:
    """Where ``reporter`` takes one-line notes: its ``on_message``, or None when it has none of its
    own (a subclass that does not override it, a duck reporter without one), so that the caller
    can say the note another way (a warning)."""
    if isinstance(reporter, DuckReporter):
        return reporter.message
    if type(reporter).on_message is TrainCallback.on_message:
        return None
    return reporter.on_message


@dataclass(frozen=True)
class Callbacks:
    """``train``'s callbacks, bound once: each one's ``on_iteration_end(control, iteration)`` and
    ``on_epoch_end(control, metrics)``, in the order given (``iteration`` is the global count
    after the step)."""

    iteration_end: tuple[Callable[[TrainControl, int], Any], ...] = ()
    epoch_end: tuple[Callable[[TrainControl, EpochMetrics], Any], ...] = ()

    @classmethod
    def of(cls, callbacks: Callbacks | Iterable[object]) -> Callbacks:
        """Bind ``callbacks`` (already bound: themselves).

        Raises:
            TypeError: a callback with neither method (one line): it would never be called;
                a ``TrainCallback`` belongs in ``reporter=``.
        """
        if isinstance(callbacks, Callbacks):
            return callbacks
        iteration_end, epoch_end = [], []
        for index, callback in enumerate(callbacks):
            on_iteration_end = _method(callback, "on_iteration_end")
            on_epoch_end = _method(callback, "on_epoch_end")
            if on_iteration_end is None and on_epoch_end is None:
                raise TypeError(
                    f"callbacks[{index}] ({type(callback).__name__}) has neither {' nor '.join(CALLBACK_EVENTS)}"
                    + (": a reporter goes to reporter=" if isinstance(callback, TrainCallback) else "")
                )
            if on_iteration_end is not None:
                iteration_end.append(on_iteration_end)
            if on_epoch_end is not None:
                epoch_end.append(on_epoch_end)
        return cls(tuple(iteration_end), tuple(epoch_end))

    def iteration_ended(self, control: TrainControl, iteration: int) -> None:
        """Call every ``on_iteration_end``."""
        for call in self.iteration_end:
            call(control, iteration)

    def epoch_ended(self, control: TrainControl, metrics: EpochMetrics) -> None:
        """Call every ``on_epoch_end``."""
        for call in self.epoch_end:
            call(control, metrics)
