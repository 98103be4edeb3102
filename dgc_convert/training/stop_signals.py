"""Ctrl-C and SIGTERM during training: finish the iteration, write a checkpoint, stop.

The first SIGINT or SIGTERM only sets ``control.stop_requested``; the trainer
checks it between iterations, so a checkpoint is never taken mid-update. A
second SIGINT raises ``KeyboardInterrupt`` at once. While a checkpoint is
written, signals wait (``held``), so a save is never cut in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["StopSignals"]


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM asks ``control`` for a clean stop; a second SIGINT aborts.

    ``control`` needs ``stop_requested`` and ``request_stop()``;
    ``notify`` (optional) receives one line for the user when a stop is asked.
    Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self, control: Any, notify: Callable[[str], None] | None = None) -> None:
        self.control = control
        self.notify = notify
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.control.stop_requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.control.request_stop()
        if self.notify is not None:
            self.notify("stopping after this iteration to write a checkpoint (Ctrl-C again aborts without one)")

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Defer signals while the block runs (a checkpoint being written), then deliver them."""
        if not self.previous:
            yield
            return
        pending: list[int] = []
        for number in self.previous:
            signal.signal(number, lambda n, f: pending.append(n))
        try:
            yield
        finally:
            for number in self.previous:
                signal.signal(number, self._handle)
            for number in pending:
                self._handle(number, None)
