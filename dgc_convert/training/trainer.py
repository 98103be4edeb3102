"""Training with the paper's three-stage schedule, on one process or many (torchrun): the run that
strings the parts together (resume checks, random streams, checkpoints, ``metrics.jsonl``).

What each epoch does, how Ctrl-C and divergence end a run, and which module holds which part:
``docs/training.md``, "One training run".
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import yaml
from timm.utils import distribute_bn

from dgc_convert.conversion.saved_models import apply_saved_layouts, read_metadata, saved_layer_settings
from dgc_convert.conversion.surgery import dgc_layers, set_zeta
from dgc_convert.files.atomic import atomic_write, naming_os_errors
from dgc_convert.files.checkpoint_dirs import find_checkpoint
from dgc_convert.files.names import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    TRAINING_FILE,
)
from dgc_convert.measuring.macs import count_macs
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.training.adapters import Callbacks, as_reporter, message_sink
from dgc_convert.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    RunState,
    RunStatus,
    load_optimizer_state,
    read_checkpoint,
    save_checkpoint,
    sweep_checkpoints,
)
from dgc_convert.training.distributed import Processes
from dgc_convert.training.events import (
    EpochMetrics,
    IterationStats,
    RunInfo,
    TrainCallback,
    TrainControl,
    TrainingDiverged,
    TrainReporter,
    TrainResult,
)
from dgc_convert.training.loop import EpochFigures, apply_schedule, mean_zeta_t, train_one_epoch, validate
from dgc_convert.training.recipe import Recipe, recipe_from_dict
from dgc_convert.training.run_lock import run_lock
from dgc_convert.training.setup import TrainingSetup, build_training, iterations_per_epoch, resolve_image_size
from dgc_convert.training.stop_signals import StopSignals
from dgc_convert.training.watch import Reporters, require_tensorboard, watchers

__all__ = [
    "EpochMetrics",
    "IterationStats",
    "RunInfo",
    "TrainCallback",
    "TrainControl",
    "TrainReporter",
    "TrainResult",
    "TrainingDiverged",
    "is_main_process",
    "iterations_per_epoch",
    "resolve_image_size",
    "train",
]

# Keys that may differ between a run and its resumption without changing the result.
_RESUME_MAY_DIFFER = {
    ("output", "directory"),
    ("train", "num_workers"),
    ("train", "checkpoint_every"),
    ("train", "tensorboard"),  # also absent from recipes saved before it existed
}
# Reseeding after a resume on another process count: a stream per (rank, iteration).
_RESEED_STRIDE = 7919


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _determinism(seed: int, deterministic: bool) -> Iterator[None]:
    """Seed Python and torch; with ``deterministic``, force deterministic kernels for the run only."""
    random.seed(seed)
    torch.manual_seed(seed)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a kernel without a deterministic version warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


# -- resuming ---------------------------------------------------------------


def _recipe_differences(saved: dict, current: dict, path: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    differences = []
    for key in sorted(set(saved) | set(current)):
        where = (*path, key)
        if where in _RESUME_MAY_DIFFER:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _recipe_differences(a, b, where)
        elif a != b:
            differences.append((".".join(where), a, b))
    return differences


def _open_checkpoint(recipe: Recipe, output: Path, resume: bool) -> tuple[Checkpoint, RunState] | None:
    """The checkpoint to resume (checked to hold the same recipe), or None for a fresh run.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a fresh run over an
            existing one, or a recipe that differs from the checkpoint's.
    """
    existing = find_checkpoint(output / LAST_CHECKPOINT)
    if not resume:
        if existing is not None:
            raise CheckpointError(
                f"{output} already holds a run's checkpoint; pass --resume to continue it, "
                f"or choose a new output.directory (--set output.directory=...)"
            )
        return None
    if existing is None:
        raise CheckpointError(f"{output}: no checkpoint to resume (expected {output / LAST_CHECKPOINT}/)")
    checkpoint = read_checkpoint(existing)
    state = checkpoint.run_state()
    differences = _recipe_differences(state.recipe, recipe.model_dump(mode="json"))
    if differences:
        key, old, new = differences[0]
        raise CheckpointError(
            f"{output}: the recipe differs from the checkpoint's at {key} ({old!r} there, {new!r} now); "
            f"resume with the same recipe, or train into a new output.directory"
        )
    return checkpoint, state


def _gather_rng(processes: Processes) -> dict[str, Any]:
    """Python's generator state, and torch's CPU (and CUDA) generator states of every rank in rank order."""
    states: dict[str, Any] = {"python": random.getstate(), "torch_cpu": processes.gather(torch.get_rng_state())}
    if processes.device.type == "cuda":
        states["torch_cuda"] = processes.gather(torch.cuda.get_rng_state(processes.device))
    return states


def _restore_rng(rng: dict[str, Any], processes: Processes) -> bool:
    """Put this rank's saved generator states back; False (nothing restored) when they were
    saved on another number of processes."""
    cpu_states = rng["torch_cpu"]
    if len(cpu_states) != processes.world_size:
        return False
    torch.set_rng_state(cpu_states[processes.rank])
    if processes.device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"][processes.rank], processes.device)
    python = rng["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    return True


def _kept_metrics(path: Path, epochs_completed: int, rewrite: bool) -> list[EpochMetrics]:
    """The ``metrics.jsonl`` lines of the first ``epochs_completed`` epochs; with ``rewrite``
    the file keeps only those (the later epochs will run again)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("epoch", 0) <= epochs_completed:
            kept.append(row)
    if rewrite:  # atomically: a failure keeps the whole history
        with atomic_write(path) as written:
            written.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    return [EpochMetrics(**row) for row in kept if set(row) == set(EpochMetrics.__dataclass_fields__)]


# -- the run ----------------------------------------------------------------


@dataclass
class _Progress:
    """Where the run stands: counts, best top-1 (percent) and metrics so far, and
    wall seconds spent before this call (a resumed run's earlier calls)."""

    epochs_completed: int = 0
    iteration: int = 0
    epoch_iteration: int = 0
    best_top1: float | None = None
    metrics: list[EpochMetrics] = field(default_factory=list)
    wall_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        """Wall-clock seconds of the whole run so far, over every resumption."""
        return self.wall_before + time.perf_counter() - self.started


def _restore(
    setup: TrainingSetup,
    checkpoint: Checkpoint,
    state: RunState,
    output: Path,
    reporter: TrainCallback,
    started: float,
) -> _Progress:
    """Load weights, optimizer, scaler and generator states from ``checkpoint``; the progress it
    recorded (``started``: this call's ``time.perf_counter()`` at its start, seconds)."""
    if state.iterations_per_epoch != setup.schedule.iterations_per_epoch:
        raise CheckpointError(
            f"{checkpoint.directory}: saved with {state.iterations_per_epoch} iterations per epoch, now "
            f"{setup.schedule.iterations_per_epoch} (different data or process count); cannot resume exactly"
        )
    # ``train`` builds a resumed model from the checkpoint's saved layers; a setup built otherwise
    # gets their layouts (interleaved, before blocked head ownership), or a one-line mismatch.
    apply_saved_layouts(setup.model, read_metadata(checkpoint.directory / MODEL_FILE))
    checkpoint.load_weights(setup.model, device="cpu")
    setup.model.to(setup.processes.device)
    training = checkpoint.training_state()
    missing = [key for key in ("optimizer", "rng") if key not in training]
    if missing:
        raise CheckpointError(f"{checkpoint.directory / TRAINING_FILE}: the training state lacks {missing[0]!r}")
    load_optimizer_state(setup.optimizer, training["optimizer"], checkpoint.directory / TRAINING_FILE)
    if training.get("scaler"):
        setup.scaler.load_state_dict(training["scaler"])
    p = setup.processes
    if not _restore_rng(training["rng"], p):
        torch.manual_seed(setup.recipe.train.seed + p.rank + _RESEED_STRIDE * state.iteration)
        reporter.on_message(
            f"resuming on {p.world_size} processes, saved on "
            f"{len(training['rng']['torch_cpu'])}: random streams are reseeded, so the result will not match "
            "an uninterrupted run bit for bit",
        )
    return _Progress(
        epochs_completed=state.epochs_completed,
        iteration=state.iteration,
        epoch_iteration=state.epoch_iteration,
        best_top1=state.best_top1,
        wall_before=state.wall_seconds,
        started=started,
        metrics=_kept_metrics(output / METRICS_FILE, state.epochs_completed, rewrite=p.main),
    )


class _Run:
    """One call of ``train``: the epochs from where ``progress`` stands, with checkpoints and reports."""

    def __init__(
        self,
        setup: TrainingSetup,
        progress: _Progress,
        output: Path,
        reporter: TrainCallback,
        callbacks: Callbacks,
    ) -> None:
        self.setup = setup
        self.progress = progress
        self.output = output
        # Rank 0 also redraws curves.png after every epoch and, with train.tensorboard, writes event files.
        self.watch = Reporters(
            reporter,
            watchers(
                output,
                tensorboard=setup.recipe.train.tensorboard,
                warn=reporter.on_message,
            )
            if setup.processes.main
            else (),
        )
        # Other ranks report nothing: a silent reporter, called all the same.
        self.reporter: TrainCallback = self.watch if setup.processes.main else TrainCallback()
        self.callbacks = callbacks
        self.control = TrainControl(setup.model)
        self.signals = StopSignals(self.control, self.reporter.on_message if setup.processes.main else None)

    def run(self) -> TrainResult:
        setup, progress, t = self.setup, self.progress, self.setup.recipe.train
        with self.signals, contextlib.closing(self.watch):
            if setup.processes.main:
                with atomic_write(self.output / RECIPE_FILE) as written:
                    written.write_text(
                        yaml.safe_dump(setup.recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
                    )
            self.reporter.on_start(self._info())
            status: Literal["finished", "interrupted"] = "finished"
            while progress.epochs_completed < t.epochs:
                if not self._epoch():
                    status = "interrupted"
                    break
            set_zeta(setup.dgc, fraction=setup.schedule.zeta_fraction(progress.iteration))
            result = TrainResult(
                status=status,
                output_dir=self.output,
                epochs_completed=progress.epochs_completed,
                iteration=progress.iteration,
                total_iterations=setup.schedule.total_iterations,
                metrics=progress.metrics,
                best_top1=progress.best_top1,
                wall_seconds=progress.wall_seconds(),
                model=setup.model,
            )
            self.reporter.on_finish(result)
            return result

    def _info(self) -> RunInfo:
        setup, recipe = self.setup, self.setup.recipe
        with dgc_mode(setup.dgc, zeta_fraction=1.0):
            target = count_macs(setup.model, setup.image_size)
        return RunInfo(
            model=recipe.model.name,
            dataset=recipe.data.dataset,
            output_dir=self.output,
            image_size=setup.image_size,
            num_classes=setup.data.num_classes,
            train_samples=len(setup.data.train),
            val_samples=setup.val_samples,
            epochs=recipe.train.epochs,
            iterations_per_epoch=setup.schedule.iterations_per_epoch,
            start_epoch=self.progress.epochs_completed,
            start_iteration=self.progress.iteration,
            world_size=setup.processes.world_size,
            device=str(setup.processes.device),
            converted_layers=len(dgc_layers(setup.model)),
            dense_macs=setup.dense_macs,
            target_macs=target.total_macs,
            macs_expected=target.expected,
            stages=[asdict(s) for s in setup.schedule.stages()],
        )

    def _epoch(self) -> bool:
        """Train one epoch (or its remainder), evaluate, write; False when stopped early with a checkpoint."""
        setup, progress, t, p = self.setup, self.progress, self.setup.recipe.train, self.setup.processes
        epoch = progress.epochs_completed
        epoch_start = time.perf_counter()
        try:
            figures = train_one_epoch(
                setup.train_model,
                setup.train_loader(epoch, progress.epoch_iteration),
                optimizer=setup.optimizer,
                scaler=setup.scaler,
                criterion=setup.criterion,
                schedule=setup.schedule,
                layers=setup.dgc,
                epoch=epoch,
                start_iteration=progress.iteration,
                start_epoch_iteration=progress.epoch_iteration,
                sparsity_lambda=t.sparsity_lambda,
                processes=p,
                autocast=setup.autocast,
                channels_last=t.channels_last,
                control=self.control,
                callbacks=self.callbacks,
                reporter=self.reporter,
            )
        except TrainingDiverged as error:
            last = find_checkpoint(self.output / LAST_CHECKPOINT)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"{error}; stopped, {kept}. Try a lower train.lr or train.amp=off") from None
        progress.iteration, progress.epoch_iteration = figures.iteration, figures.epoch_iteration
        if not figures.completed:
            self._save_last("interrupted")
            return False
        if p.distributed:
            # Each rank's BatchNorm statistics saw only its own batches: average them so
            # every rank evaluates (and would save) the same model.
            distribute_bn(setup.model, p.world_size, reduce=True)
        progress.epochs_completed += 1
        progress.epoch_iteration = 0
        metrics = self._metrics(figures, epoch_start)
        progress.metrics.append(metrics)
        if p.main:
            # Appended in place (a line per epoch); a failed write names the file.
            with (
                naming_os_errors(self.output / METRICS_FILE),
                open(self.output / METRICS_FILE, "a", encoding="utf-8") as handle,
            ):
                handle.write(json.dumps(asdict(metrics)) + "\n")
        self.reporter.on_epoch(metrics)
        at_target = setup.schedule.zeta_fraction(progress.iteration) >= 1.0
        if at_target and (progress.best_top1 is None or metrics.val_top1 > progress.best_top1):
            progress.best_top1 = metrics.val_top1
            self._save_best()
        self.callbacks.epoch_ended(self.control, metrics)
        # A callback may have asked on one rank only: every rank learns of it.
        stop = p.all_reduce([float(self.control.stop_requested)], dist.ReduceOp.MAX if p.distributed else None)[0] > 0
        finished = progress.epochs_completed == t.epochs
        if finished or stop or progress.epochs_completed % t.checkpoint_every == 0:
            self._save_last("finished" if finished else ("interrupted" if stop else "running"))
        return finished or not stop

    def _metrics(self, figures: EpochFigures, epoch_start: float) -> EpochMetrics:
        """Evaluate at the ratio the next iteration would use (the target after the last one)."""
        setup, progress, t = self.setup, self.progress, self.setup.recipe.train
        apply_schedule(setup.schedule, progress.iteration, setup.dgc, setup.optimizer)
        val_loss, top1, top5 = validate(
            setup.model,
            setup.val_loader(),
            num_classes=setup.data.num_classes,
            processes=setup.processes,
            autocast=setup.autocast,
            channels_last=t.channels_last,
        )
        return EpochMetrics(
            epoch=progress.epochs_completed,
            iteration=progress.iteration,
            progress=setup.schedule.progress(progress.iteration),
            stage=setup.schedule.stage(max(progress.iteration - 1, 0)),
            lr=figures.lr,
            zeta_t=mean_zeta_t(setup.dgc),
            train_loss=figures.loss,
            train_top1=figures.top1,
            sparsity=figures.sparsity,
            val_loss=val_loss,
            val_top1=top1,
            val_top5=top5,
            macs=count_macs(setup.model, setup.image_size).total_macs,
            dense_macs=setup.dense_macs,
            images_per_second=figures.images_per_second,
            epoch_seconds=time.perf_counter() - epoch_start,
            wall_seconds=progress.wall_seconds(),
        )

    def _state(self, status: RunStatus) -> RunState:
        setup, progress = self.setup, self.progress
        return RunState(
            status=status,
            recipe=setup.recipe.model_dump(mode="json"),
            epochs_completed=progress.epochs_completed,
            iteration=progress.iteration,
            epoch_iteration=progress.epoch_iteration,
            iterations_per_epoch=setup.schedule.iterations_per_epoch,
            total_iterations=setup.schedule.total_iterations,
            progress=setup.schedule.progress(progress.iteration),
            zeta_fraction=setup.schedule.zeta_fraction(progress.iteration),
            zeta_t={name: layer.zeta_t_value for name, layer in dgc_layers(setup.model)},
            image_size=setup.image_size,
            num_classes=setup.data.num_classes,
            world_size=setup.processes.world_size,
            best_top1=progress.best_top1,
            metrics=asdict(progress.metrics[-1]) if progress.metrics else None,
            wall_seconds=progress.wall_seconds(),
        )

    def _save_last(self, status: RunStatus) -> None:
        # Every rank takes part in gathering generator states; rank 0 writes.
        setup = self.setup
        training_state = {
            "optimizer": setup.optimizer.state_dict(),
            "scaler": setup.scaler.state_dict(),
            "rng": _gather_rng(setup.processes),
        }
        if setup.processes.main:
            with self.signals.held():
                save_checkpoint(
                    self.output / LAST_CHECKPOINT,
                    model=setup.model,
                    state=self._state(status),
                    training_state=training_state,
                )
        setup.processes.barrier()

    def _save_best(self) -> None:
        if self.setup.processes.main:
            with self.signals.held():
                save_checkpoint(self.output / BEST_CHECKPOINT, model=self.setup.model, state=self._state("best"))


def _lock_notice(reporter: TrainCallback) -> Callable[[str], Any]:
    """Where the one line about taking over a stale run lock goes: the reporter's ``on_message``,
    else (no reporter, or one without messages of its own) a warning."""
    sink = message_sink(reporter)
    if sink is not None:
        return sink
    return lambda text: warnings.warn(text, stacklevel=4)


def train(
    recipe: Recipe | dict,
    *,
    resume: bool = False,
    reporter: TrainCallback | TrainReporter | None = None,
    callbacks: Sequence[object] = (),
) -> TrainResult:
    """Train the recipe's model from scratch (or ``resume`` its ``last`` checkpoint).

    Args:
        recipe: a ``Recipe`` (or a mapping validated as one).
        resume: continue from ``output.directory/last``; the recipe must match
            the checkpoint's (output directory, workers and checkpoint interval
            may differ).
        reporter: receives progress on rank 0: a ``TrainCallback`` (subclass), or
            any object with some of its ``on_*`` methods (adapted once, here).
        callbacks: objects with ``on_iteration_end(control, iteration)``
            and/or ``on_epoch_end(control, metrics)``, called on every rank;
            ``control.request_stop()`` ends the run with a checkpoint.

    Returns:
        A ``TrainResult``; ``status`` is ``interrupted`` when a signal or a
        callback stopped the run (``last`` holds where it stopped).

    Raises:
        TypeError: a reporter with none of the ``on_*`` methods, or a callback
            with neither of its two (one line, before anything runs).
        TrainingDiverged: the loss became non-finite.
        RunLockedError: another live run holds ``output.directory``'s lock
            (checked first, on rank 0, before anything is written).
        DGCConvertError: bad recipe values, data or checkpoints (one-line messages).
    """
    # The caller's objects are checked and bound once, before anything runs.
    listener, hooks = as_reporter(reporter), Callbacks.of(callbacks)
    if not isinstance(recipe, Recipe):
        recipe = recipe_from_dict(recipe)
    if recipe.train.tensorboard:
        require_tensorboard()  # every rank: none may wait on a rank 0 that cannot start
    started = time.perf_counter()
    processes = Processes.from_env()
    output = Path(recipe.output.directory).expanduser()
    try:
        # Rank 0 holds the output directory's lock for the run's whole life, and tidies what a
        # crashed run left there (temporary checkpoint directories, a checkpoint set aside).
        with (
            run_lock(output, enabled=processes.main, notify=_lock_notice(listener)),
            _determinism(recipe.train.seed, recipe.train.deterministic),
        ):
            if processes.main:
                sweep_checkpoints(output, owned=True)
            opened = _open_checkpoint(recipe, output, resume)
            # A resumed run's weights are its own checkpoint's, not model.checkpoint's (not even read),
            # and so are its DGC layers: what the version that started it converted.
            saved = None if opened is None else saved_layer_settings(read_metadata(opened[0].directory / MODEL_FILE))
            setup = build_training(recipe, processes, load_checkpoint=opened is None, layers=saved)
            if opened is not None:
                progress = _restore(setup, *opened, output, listener if processes.main else TrainCallback(), started)
            else:
                # Fresh run: the model was initialised from the run's seed (seeded
                # above); now give each rank its own stream (dropout, ...), reproducibly.
                torch.manual_seed(recipe.train.seed + processes.rank)
                progress = _Progress(started=started)
            return _Run(setup, progress, output, listener, hooks).run()
    finally:
        processes.close()
