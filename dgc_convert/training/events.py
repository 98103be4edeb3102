"""What training tells the outside: the figures it reports, how it ends, and the handle callbacks get.

``train`` sends a ``RunInfo`` once, ``IterationStats`` every few iterations,
``EpochMetrics`` after each epoch and a ``TrainResult`` at the end to its
reporter (rank 0 only), by calling the ``TrainCallback`` methods: reporters
subclass it and override what they need. Callbacks receive a
``TrainControl``. Nothing here trains or prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dgc_convert.errors import TrainingDiverged
from dgc_convert.files.names import CURVES_FILE, METRICS_FILE, RECIPE_FILE, TENSORBOARD_DIR

if TYPE_CHECKING:  # annotations only: the reporters (progress bars) import this module without torch
    from torch import nn

__all__ = [
    "CURVES_FILE",
    "METRICS_FILE",
    "RECIPE_FILE",
    "TENSORBOARD_DIR",
    "EpochMetrics",
    "IterationStats",
    "RunInfo",
    "TrainCallback",
    "TrainControl",
    "TrainReporter",
    "TrainResult",
    "TrainingDiverged",
]


@dataclass
class RunInfo:
    """What a run is about to do (sent to the reporter once, at start).

    ``image_size`` is the square side in pixels; ``start_epoch`` and
    ``start_iteration`` count what was done before (0 for a fresh run); MACs
    are per sample, ``dense_macs`` before conversion and ``target_macs`` at
    the target pruning ratio; ``stages`` are ``StageRange``s as dicts.
    ``macs_expected``: the model is network-gated (DGC-G), so its DGC MAC
    figures (``target_macs``, each epoch's ``macs``) are expected costs
    (``MacReport.expected``).
    """

    model: str
    dataset: str
    output_dir: Path
    image_size: int
    num_classes: int
    train_samples: int
    val_samples: int
    epochs: int
    iterations_per_epoch: int
    start_epoch: int
    start_iteration: int
    world_size: int
    device: str
    converted_layers: int
    dense_macs: int
    target_macs: int
    stages: list[dict[str, Any]]
    macs_expected: bool = False


@dataclass
class IterationStats:
    """Running figures inside an epoch (sent every few iterations).

    ``epoch`` is 1-based; ``loss`` is the mean per sample and ``train_top1`` a
    percentage, both over this call's part of the epoch on this rank;
    ``zeta_t`` is the mean ratio over DGC layers; ``images_per_second``
    counts every rank's images.
    """

    epoch: int
    epoch_iteration: int
    iterations_per_epoch: int
    iteration: int
    loss: float
    train_top1: float
    zeta_t: float
    lr: float
    images_per_second: float


@dataclass
class EpochMetrics:
    """One epoch's figures; one line of ``metrics.jsonl``.

    ``epoch`` is 1-based; ``iteration`` is the global iteration count after it;
    accuracies are percentages; MACs are per sample at the ``zeta_t`` the
    model had when evaluated; seconds are wall-clock.
    """

    epoch: int
    iteration: int
    progress: float
    stage: str
    lr: float
    zeta_t: float
    train_loss: float
    train_top1: float
    sparsity: float
    val_loss: float
    val_top1: float
    val_top5: float | None
    macs: int
    dense_macs: int
    images_per_second: float
    epoch_seconds: float
    wall_seconds: float


@dataclass
class TrainResult:
    """How a run ended: ``finished`` or ``interrupted`` (a checkpoint was written).

    ``metrics`` holds every epoch completed so far (those before a resume
    included); ``best_top1`` is a percentage at the target ratio;
    ``wall_seconds`` counts every resumption.
    """

    status: Literal["finished", "interrupted"]
    output_dir: Path
    epochs_completed: int
    iteration: int
    total_iterations: int
    metrics: list[EpochMetrics]
    best_top1: float | None
    wall_seconds: float
    model: nn.Module = field(repr=False)

    @property
    def final(self) -> EpochMetrics | None:
        """The last epoch's metrics (None when no epoch completed in this call)."""
        return self.metrics[-1] if self.metrics else None


class TrainCallback:
    """Base class of training reporters: ``train`` calls these methods on rank 0, in this order.

    ``on_start`` once, ``on_iteration`` every few iterations, ``on_epoch``
    after each epoch (its line is already in ``metrics.jsonl``),
    ``on_message`` for a one-line note (resuming, stopping, a picture that
    could not be drawn), ``on_finish`` when the run ends, finished or
    interrupted. Every method does nothing here: a subclass overrides the
    events it cares about. ``close`` is for the reporter's owner, who calls
    it when the run is over (also after an exception); ``train`` closes only
    the reporters it makes itself. An object that does not subclass this but
    has some of the ``on_*`` methods is accepted too (adapted once per run,
    ``training.adapters.as_reporter``).
    """

    def on_start(self, info: RunInfo) -> None:
        """The run is about to start (or resume)."""

    def on_iteration(self, stats: IterationStats) -> None:
        """Running figures inside an epoch."""

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """An epoch ended and was evaluated."""

    def on_message(self, text: str) -> None:
        """A one-line note from the trainer for the user."""

    def on_finish(self, result: TrainResult) -> None:
        """The run ended, finished or interrupted."""

    def close(self) -> None:
        """Release what the reporter holds (bars, files); idempotent."""


class TrainReporter(Protocol):
    """The shape of a duck-typed reporter, kept for type annotations; subclass ``TrainCallback`` instead.

    ``train`` accepts an object with any of these methods (at least one).
    """

    def on_start(self, info: RunInfo) -> None: ...
    def on_iteration(self, stats: IterationStats) -> None: ...
    def on_epoch(self, metrics: EpochMetrics) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_finish(self, result: TrainResult) -> None: ...


class TrainControl:
    """Handed to callbacks: the (unwrapped) ``model`` being trained, and
    ``request_stop()``, which ends the run at the next check with a checkpoint."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self.stop_requested = False

    def request_stop(self) -> None:
        """Stop after the current iteration (within a few iterations) and write ``last``."""
        self.stop_requested = True
