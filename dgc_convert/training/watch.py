"""Watching a run: its curves redrawn after every epoch, and TensorBoard scalars.

Both are ``TrainCallback``s: the trainer sends them the events every
reporter gets (rank 0 only), beside the caller's own reporter, through one
``Reporters`` fan-out. ``CurvesWriter`` redraws ``curves.png`` from
``metrics.jsonl`` after each epoch, so the picture always shows what the
file holds, the epochs before a resume included. ``TensorBoardWriter``
writes every number of ``IterationStats`` and ``EpochMetrics`` as a scalar
at the global iteration, and hides what an earlier session wrote past the
checkpoint a resume starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dgc_convert.errors import SettingsError, first_line
from dgc_convert.files.names import CURVES_FILE, TENSORBOARD_DIR
from dgc_convert.training.events import EpochMetrics, IterationStats, RunInfo, TrainCallback, TrainResult

__all__ = [
    "TENSORBOARD_MISSING",
    "CurvesWriter",
    "Reporters",
    "TensorBoardWriter",
    "require_tensorboard",
    "watchers",
]

TENSORBOARD_MISSING = 'train.tensorboard needs the tensorboard package: pip install "dgc-convert[tensorboard]"'

# Counters are the steps scalars are written at, not figures to chart.
_ITERATION_COUNTERS = {"epoch", "epoch_iteration", "iterations_per_epoch", "iteration"}
_EPOCH_COUNTERS = {"epoch", "iteration"}


class Reporters(TrainCallback):
    """Several reporters as one: each event goes to ``reporter`` (the caller's), then to each watcher.

    ``close()`` closes the watchers only (the caller's reporter is the caller's).
    """

    def __init__(self, reporter: TrainCallback, watchers: Iterable[TrainCallback] = ()) -> None:
        self.reporter = reporter
        self.watchers = list(watchers)
        self.every = [reporter, *self.watchers]

    def on_start(self, info: RunInfo) -> None:
        """The run is about to start (or resume)."""
        for target in self.every:
            target.on_start(info)

    def on_iteration(self, stats: IterationStats) -> None:
        """Running figures inside an epoch."""
        for target in self.every:
            target.on_iteration(stats)

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """An epoch ended (its line is already in ``metrics.jsonl``)."""
        for target in self.every:
            target.on_epoch(metrics)

    def on_message(self, text: str) -> None:
        """A note from the trainer."""
        for target in self.every:
            target.on_message(text)

    def on_finish(self, result: TrainResult) -> None:
        """The run ended, finished or interrupted."""
        for target in self.every:
            target.on_finish(result)

    def close(self) -> None:
        """Close every watcher (also when the run ended with an exception)."""
        for watcher in self.watchers:
            watcher.close()


class CurvesWriter(TrainCallback):
    """Redraws ``curves.png`` (see ``plots.draw_curves``) from the run's ``metrics.jsonl`` after each epoch.

    A picture that cannot be drawn (a full disk, a broken font cache) must not
    end a long run: the first failure goes to ``warn`` (one line), later ones
    are retried silently at the next epoch.
    """

    def __init__(self, directory: str | Path, warn: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CURVES_FILE
        self.warn = warn
        self.writes = 0  # pictures written by this object
        self.failed = False

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """Draw every epoch recorded so far."""
        try:
            # Imported here, inside the courtesy: a broken matplotlib costs a warning, not the run.
            from dgc_convert.files.plots import read_run, write_curves

            write_curves([read_run(self.directory)], self.path)
        except Exception as error:  # drawing is a courtesy: training goes on whatever happens to it
            if not self.failed and self.warn is not None:
                self.warn(f"could not draw {self.path} ({type(error).__name__}: {first_line(error)}); training goes on")
            self.failed = True
        else:
            self.writes += 1


def require_tensorboard() -> None:
    """Check that ``torch.utils.tensorboard`` imports (it needs the tensorboard package).

    Raises:
        SettingsError: the package is missing; the message says how to install it.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401  # imports the tensorboard package, or fails
    except ImportError:
        raise SettingsError(TENSORBOARD_MISSING) from None


def _scalars(figures: Any, counters: set[str]) -> list[tuple[str, float]]:
    """(field, value) for every number of a dataclass, counters, texts and Nones left out."""
    return [
        (key, float(value))
        for key, value in asdict(figures).items()
        if key not in counters and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


class TensorBoardWriter(TrainCallback):
    """TensorBoard scalars in ``directory``: ``iteration/<field>`` for each ``IterationStats``
    and ``epoch/<field>`` for each ``EpochMetrics`` (MACs per sample, seconds, ...).

    Every scalar is written at the global iteration (an epoch's at the
    iteration that ends it), so one step axis serves both and one purge step
    covers both: each session starts its event file with TensorBoard's
    restart marker at the iteration after its start, which hides whatever an
    earlier session wrote beyond the checkpoint this one resumes (no step
    shows twice). Events are flushed after every epoch and at most
    ``flush_seconds`` apart.
    """

    def __init__(self, directory: str | Path, flush_seconds: int = 30) -> None:
        self.directory = Path(directory)
        self.flush_seconds = flush_seconds
        self.writer: Any = None  # a torch.utils.tensorboard.SummaryWriter once started

    def on_start(self, info: RunInfo) -> None:
        """Open a new event file; ``purge_step`` hides events of steps after ``info.start_iteration``."""
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.writer = SummaryWriter(
            log_dir=str(self.directory), purge_step=info.start_iteration + 1, flush_secs=self.flush_seconds
        )

    def on_iteration(self, stats: IterationStats) -> None:
        """``iteration/loss``, ``iteration/lr``, ``iteration/zeta_t``, ... at ``stats.iteration``."""
        if self.writer is not None:
            for key, value in _scalars(stats, _ITERATION_COUNTERS):
                self.writer.add_scalar(f"iteration/{key}", value, stats.iteration)

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """``epoch/val_top1``, ``epoch/macs``, ``epoch/wall_seconds``, ... at ``metrics.iteration``; then flush."""
        if self.writer is not None:
            for key, value in _scalars(metrics, _EPOCH_COUNTERS):
                self.writer.add_scalar(f"epoch/{key}", value, metrics.iteration)
            self.writer.flush()

    def on_finish(self, result: TrainResult) -> None:
        """Flush and close the event file."""
        self.close()

    def close(self) -> None:
        """Flush and close the event file (again: nothing)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def watchers(
    directory: str | Path, *, tensorboard: bool, warn: Callable[[str], None] | None = None
) -> list[TrainCallback]:
    """The reporters every run on rank 0 gets for its output ``directory``: a ``CurvesWriter``
    and, with ``tensorboard``, a ``TensorBoardWriter`` into ``directory/tensorboard``."""
    directory = Path(directory)
    found: list[TrainCallback] = [CurvesWriter(directory, warn)]
    if tensorboard:
        found.append(TensorBoardWriter(directory / TENSORBOARD_DIR))
    return found
