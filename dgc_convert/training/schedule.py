"""The paper's three-stage schedule as pure functions of training progress.

Progress ``p = iteration / total_iterations`` advances every iteration.

- warm-up, ``p < warmup_fraction``: zeta_t = 0 (dense behaviour; the gates
  still learn);
- ramp, up to ``1 - finetune_fraction``: zeta_t rises from 0 to the target
  (linear in p, as the released code does, or a cosine ease);
- fine-tune, the rest: zeta_t = the target.

The learning rate follows one cosine over the whole run. Nothing here knows
about models or optimizers, so every value can be tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Stage", "StageRange", "Schedule", "zeta_fraction", "cosine_lr", "stage_at"]

Stage = Literal["warmup", "ramp", "finetune"]
Ramp = Literal["linear", "cosine"]


def stage_at(progress: float, warmup_fraction: float, finetune_fraction: float) -> Stage:
    """The stage training is in at ``progress`` in [0, 1]."""
    if progress < warmup_fraction:
        return "warmup"
    if progress < 1.0 - finetune_fraction:
        return "ramp"
    return "finetune"


def zeta_fraction(progress: float, warmup_fraction: float, finetune_fraction: float, ramp: Ramp = "linear") -> float:
    """Fraction of the target pruning ratio in force at ``progress``, in [0, 1].

    Each layer's ``zeta_t`` is its target ``zeta`` times this fraction, so
    layers with their own targets move together.
    """
    stage = stage_at(progress, warmup_fraction, finetune_fraction)
    if stage == "warmup":
        return 0.0
    if stage == "finetune":
        return 1.0
    span = 1.0 - finetune_fraction - warmup_fraction
    t = min(max((progress - warmup_fraction) / span, 0.0), 1.0)
    if ramp == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    return t


def cosine_lr(progress: float, base_lr: float) -> float:
    """``0.5 * base_lr * (1 + cos(pi * p))``: the learning rate at ``progress``."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass(frozen=True)
class StageRange:
    """One stage as half-open ranges ``[start, end)`` of global iterations and of epochs.

    ``first_epoch`` / ``last_epoch`` are 1-based and inclusive: the epochs in
    which at least one iteration of the stage runs. Empty stages have
    ``start_iteration == end_iteration``.
    """

    stage: Stage
    start_iteration: int
    end_iteration: int
    first_epoch: int
    last_epoch: int

    @property
    def iterations(self) -> int:
        """Iterations spent in the stage."""
        return self.end_iteration - self.start_iteration


# The paper's stage lengths, as fractions of the run (the recipe's defaults).
DEFAULT_WARMUP_FRACTION = 1 / 12
DEFAULT_FINETUNE_FRACTION = 1 / 4


@dataclass(frozen=True)
class Schedule:
    """The schedule of one run: its length and the recipe's schedule settings."""

    epochs: int
    iterations_per_epoch: int
    base_lr: float
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    finetune_fraction: float = DEFAULT_FINETUNE_FRACTION
    zeta_ramp: Ramp = "linear"

    @classmethod
    def from_train(cls, train: Any, iterations_per_epoch: int) -> Schedule:
        """The schedule a recipe's ``train`` section describes, at ``iterations_per_epoch``."""
        return cls(
            train.epochs,
            iterations_per_epoch,
            train.lr,
            train.warmup_fraction,
            train.finetune_fraction,
            train.zeta_ramp,
        )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise ValueError(
                f"a schedule needs at least one epoch and one iteration per epoch, got "
                f"epochs={self.epochs}, iterations_per_epoch={self.iterations_per_epoch}"
            )

    @property
    def total_iterations(self) -> int:
        """Iterations in the whole run."""
        return self.epochs * self.iterations_per_epoch

    def progress(self, iteration: int) -> float:
        """``p`` before global iteration ``iteration`` (0-based) runs; 1.0 after the last."""
        return min(iteration / self.total_iterations, 1.0)

    def stage(self, iteration: int) -> Stage:
        """The stage of global iteration ``iteration``."""
        return stage_at(self.progress(iteration), self.warmup_fraction, self.finetune_fraction)

    def zeta_fraction(self, iteration: int) -> float:
        """Fraction of the target pruning ratio used by global iteration ``iteration``."""
        return zeta_fraction(self.progress(iteration), self.warmup_fraction, self.finetune_fraction, self.zeta_ramp)

    def lr(self, iteration: int) -> float:
        """Learning rate of global iteration ``iteration``."""
        return cosine_lr(self.progress(iteration), self.base_lr)

    def stages(self) -> list[StageRange]:
        """The three stages as iteration and epoch ranges (the first iteration
        whose progress reaches a boundary starts the next stage)."""
        total = self.total_iterations

        # First iteration i with i / total >= boundary, computed with the same
        # comparison ``stage_at`` makes so the two can never disagree.
        def first_at_or_after(boundary: float) -> int:
            i = max(0, min(total, math.floor(boundary * total)))
            while i > 0 and (i - 1) / total >= boundary:
                i -= 1
            while i < total and i / total < boundary:
                i += 1
            return i

        ramp_start = first_at_or_after(self.warmup_fraction)
        finetune_start = max(ramp_start, first_at_or_after(1.0 - self.finetune_fraction))
        bounds = [("warmup", 0, ramp_start), ("ramp", ramp_start, finetune_start), ("finetune", finetune_start, total)]
        per_epoch = self.iterations_per_epoch
        ranges = []
        for stage, start, end in bounds:
            first = start // per_epoch + 1
            last = max(first, (end - 1) // per_epoch + 1) if end > start else first - 1
            ranges.append(StageRange(stage, start, end, first, last))  # type: ignore[arg-type]
        return ranges
