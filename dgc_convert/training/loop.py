"""One epoch of training and one evaluation, as plain functions (in the style of timm's
``train_one_epoch`` / ``validate``).

Each takes what it works on as arguments and returns the figures; neither
writes files or keeps state between calls. ``train_one_epoch`` sets the
schedule's learning rate and pruning ratio before every step, adds the
sparsity term to the loss, moves the network-wise threshold of DGC-G layers
after every forward, calls callbacks, and every ``check_every``
iterations lets the ranks agree on stop requests and non-finite losses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dgc_convert.conversion.surgery import set_zeta, sparsity_loss
from dgc_convert.measuring.evaluate import Scores, move_batch, score
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.network_gate import network_gated, update_threshold
from dgc_convert.training.adapters import Callbacks, as_reporter
from dgc_convert.training.distributed import Processes
from dgc_convert.training.events import IterationStats, TrainCallback, TrainControl, TrainingDiverged
from dgc_convert.training.schedule import Schedule

__all__ = ["CHECK_EVERY", "EpochFigures", "apply_schedule", "mean_zeta_t", "train_one_epoch", "validate"]

# How often (iterations) ranks agree on stop requests and the loss is checked
# for non-finite values: often enough to react within moments, rarely enough
# not to stall the GPU with host syncs.
CHECK_EVERY = 10


@dataclass
class EpochFigures:
    """What ``train_one_epoch`` did, summed over every rank.

    ``completed`` is False when a stop was agreed before the epoch's end;
    ``iteration`` / ``epoch_iteration`` are the counts after the last step
    (global, and within the epoch). ``loss`` is the mean per sample (sparsity
    term included), ``top1`` a percentage, ``sparsity`` the mean sparsity term
    per step and process, all over the steps of this call; ``samples`` counts
    every rank's images; ``lr`` is the last step's learning rate; ``seconds``
    the wall-clock time of the loop.
    """

    completed: bool
    iteration: int
    epoch_iteration: int
    steps: int
    loss: float
    top1: float
    sparsity: float
    samples: int
    lr: float
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Training images per wall-clock second, all ranks together."""
        return self.samples / max(self.seconds, 1e-9)


def mean_zeta_t(layers: Sequence[DGCConv2d]) -> float:
    """The mean current pruning ratio of ``layers`` (0 with none); no device sync."""
    return sum(layer.zeta_t_value for layer in layers) / len(layers) if layers else 0.0


def apply_schedule(
    schedule: Schedule, iteration: int, layers: Sequence[DGCConv2d], optimizer: torch.optim.Optimizer
) -> float:
    """Set every layer's ``zeta_t`` and every parameter group's learning rate for global
    ``iteration``; returns the learning rate. Layers already at their ratio are left alone."""
    set_zeta(layers, fraction=schedule.zeta_fraction(iteration))
    lr = schedule.lr(iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _agree(processes: Processes, control: TrainControl, nonfinite: Tensor) -> tuple[bool, bool]:
    """All ranks learn whether any rank wants to stop or saw a non-finite loss."""
    stop, bad = processes.all_reduce(
        [float(control.stop_requested), float(nonfinite.item())], dist.ReduceOp.MAX if processes.distributed else None
    )
    return stop > 0, bad > 0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    schedule: Schedule,
    layers: Sequence[DGCConv2d] = (),
    epoch: int,
    start_iteration: int,
    start_epoch_iteration: int = 0,
    sparsity_lambda: float = 0.0,
    processes: Processes | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    control: TrainControl | None = None,
    callbacks: Callbacks | Sequence[object] = (),
    reporter: TrainCallback | object | None = None,
    check_every: int = CHECK_EVERY,
) -> EpochFigures:
    """Train ``model`` over ``loader``'s batches: epoch ``epoch`` (0-based) or its remainder.

    Args:
        model: the model to step (DistributedDataParallel under torchrun), in train mode on return.
        loader: (images, labels) batches of this process; ``schedule.iterations_per_epoch``
            minus ``start_epoch_iteration`` of them.
        optimizer, scaler, criterion: the step; ``scaler`` may be disabled.
        schedule: sets learning rate and pruning ratio of each global iteration.
        layers: the DGC layers inside ``model`` (the schedule moves their ``zeta_t``;
            their sparsity terms times ``sparsity_lambda`` join the loss; the
            threshold of network-gated ones follows each forward, see
            ``dgc_convert.nn.network_gate``).
        epoch: 0-based epoch, for reports and the divergence message.
        start_iteration, start_epoch_iteration: global and in-epoch step counts before the first batch.
        processes: the run's processes (one CPU process when None).
        autocast: makes the forward pass's precision context.
        channels_last: feed images in channels-last layout.
        control: handed to callbacks; its stop request ends the epoch at the next check.
        callbacks: objects with an ``on_iteration_end(control, iteration)`` (or ``on_epoch_end``,
            not called here), or ``Callbacks`` already bound.
        reporter: receives ``IterationStats`` at each check (its ``on_iteration``): a
            ``TrainCallback``, or an object with some of its methods (``adapters.as_reporter``).
        check_every: in-epoch steps between checks (and at the epoch's end).

    Returns:
        The epoch's ``EpochFigures``, summed over every rank.

    Raises:
        TrainingDiverged: a rank saw a non-finite loss (the message names epoch,
            iteration, learning rate and mean ``zeta_t``).
    """
    processes = processes or Processes.single()
    control = control or TrainControl()
    hooks, listener = Callbacks.of(callbacks), as_reporter(reporter)  # bound once, called directly below
    device = processes.device
    per_epoch = schedule.iterations_per_epoch
    iteration, epoch_iteration = start_iteration, start_epoch_iteration
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    sparsity_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    nonfinite = torch.zeros((), device=device, dtype=torch.bool)
    seen = steps = 0
    completed = True
    start = time.perf_counter()
    lr = schedule.lr(iteration)
    thresholded = network_gated(layers)
    for batch in loader:
        lr = apply_schedule(schedule, iteration, layers, optimizer)
        images, labels = move_batch(batch, device, channels_last)
        with autocast():
            logits = model(images)
            loss = criterion(logits, labels)
            if layers and sparsity_lambda > 0:
                sparsity = sparsity_loss(layers)
                loss = loss + sparsity_lambda * sparsity
                sparsity_sum += sparsity.detach().double()
        if thresholded:
            update_threshold(thresholded)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * labels.shape[0]
        nonfinite |= ~torch.isfinite(loss.detach())
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        steps += 1
        iteration += 1
        epoch_iteration += 1
        hooks.iteration_ended(control, iteration)
        if epoch_iteration % check_every == 0 or epoch_iteration == per_epoch:
            stop, bad = _agree(processes, control, nonfinite)
            if bad:
                raise TrainingDiverged(
                    f"loss became non-finite at epoch {epoch + 1}, iteration {iteration} "
                    f"(lr {schedule.lr(iteration):.4g}, zeta_t {mean_zeta_t(layers):.3f})"
                )
            elapsed = time.perf_counter() - start
            listener.on_iteration(
                IterationStats(
                    epoch=epoch + 1,
                    epoch_iteration=epoch_iteration,
                    iterations_per_epoch=per_epoch,
                    iteration=iteration,
                    loss=loss_sum.item() / max(seen, 1),
                    train_top1=100.0 * correct.item() / max(seen, 1),
                    zeta_t=mean_zeta_t(layers),
                    lr=lr,
                    images_per_second=seen * processes.world_size / max(elapsed, 1e-9),
                ),
            )
            if stop and epoch_iteration < per_epoch:
                completed = False
                break
    seconds = time.perf_counter() - start
    # Every rank reaches this point after the same number of steps (stops are agreed).
    loss_total, hits, samples, sparsity_total, all_steps = processes.all_reduce(
        [loss_sum.item(), correct.item(), seen, sparsity_sum.item(), steps]
    )
    return EpochFigures(
        completed=completed,
        iteration=iteration,
        epoch_iteration=epoch_iteration,
        steps=steps,
        loss=loss_total / max(samples, 1),
        top1=100.0 * hits / max(samples, 1),
        sparsity=sparsity_total / max(all_steps, 1),
        samples=int(samples),
        lr=lr,
        seconds=seconds,
    )


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    processes: Processes | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> tuple[float, float, float | None]:
    """Held-out mean loss per sample, top-1 and top-5 (percent; top-5 None with 5 classes or fewer).

    Each rank scores its own share (``loader``); the counts are summed over
    ranks. ``model`` runs in eval mode and gets its previous mode back.
    """
    processes = processes or Processes.single()
    was_training = model.training
    model.eval()
    try:
        scores = score(model, loader, device=processes.device, channels_last=channels_last, autocast=autocast)
    finally:
        model.train(was_training)
    loss_sum, top1, top5, count = processes.all_reduce([scores.loss_sum, scores.top1, scores.top5, scores.count])
    return Scores(loss_sum, int(top1), int(top5), int(count), classes=num_classes).percentages()
