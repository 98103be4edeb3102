"""Training from scratch with the paper's three-stage schedule, on one process or many.

``train(recipe)`` builds the model, converts it (unless ``convert.enabled`` is
false, the dense baseline), and trains it: every iteration sets each DGC
layer's ``zeta_t`` from the schedule and the learning rate from one cosine;
the loss is cross entropy plus ``sparsity_lambda`` times the layers' sparsity
terms. Each epoch evaluates top-1 (top-5 with more than 5 classes) and the
MACs per sample at the current ``zeta_t``, appends a line to
``metrics.jsonl`` and writes the ``last`` checkpoint (``best`` too when the
epoch is at the target pruning ratio and beats the previous best).

Under ``torchrun --nproc_per_node N`` the same call trains with
DistributedDataParallel: ``train.batch_size`` is the global batch, split
across processes; only rank 0 reports and writes.

Ctrl-C (SIGINT) or SIGTERM finishes the current iteration, writes ``last``
and returns with ``status == "interrupted"``; a second Ctrl-C aborts at once.
A non-finite loss raises ``TrainingDiverged`` and leaves the last good
checkpoint alone. Nothing here prints: progress goes to a ``reporter``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from dgc_convert.checkpoint import Checkpoint, CheckpointError, find_checkpoint, read_checkpoint, save_checkpoint
from dgc_convert.distributed import Processes
from dgc_convert.data import build_data, dataset_classes, native_image_size
from dgc_convert.errors import DGCConvertError
from dgc_convert.evaluate import Scores, score
from dgc_convert.macs import count_macs
from dgc_convert.recipe import Recipe, recipe_from_dict
from dgc_convert.schedule import Schedule
from dgc_convert.surgery import ConversionReport, convert, dgc_layers, set_zeta, sparsity_loss
from dgc_convert.stop_signals import StopSignals
from dgc_convert.zoo import create_model

__all__ = [
    "train",
    "TrainResult",
    "EpochMetrics",
    "RunInfo",
    "IterationStats",
    "TrainReporter",
    "TrainControl",
    "TrainingDiverged",
    "build_model",
    "create_for_recipe",
    "convert_for_recipe",
    "resolve_image_size",
    "iterations_per_epoch",
    "is_main_process",
]

# How often (iterations) ranks agree on stop requests and the loss is checked
# for non-finite values: often enough to react within moments, rarely enough
# not to stall the GPU with host syncs.
_CHECK_EVERY = 10
# Keys that may differ between a run and its resumption without changing the result.
_RESUME_MAY_DIFFER = {("output", "directory"), ("train", "num_workers"), ("train", "checkpoint_every")}


class TrainingDiverged(DGCConvertError):
    """The loss became non-finite; the last good checkpoint is kept."""


@dataclass
class RunInfo:
    """What a run is about to do (sent to the reporter once, at start)."""

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


@dataclass
class IterationStats:
    """Running figures inside an epoch (sent every few iterations)."""

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
    """How a run ended: ``finished`` or ``interrupted`` (a checkpoint was written)."""

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


class TrainReporter(Protocol):
    """Where ``train`` sends progress (rank 0 only). Every method is optional."""

    def on_start(self, info: RunInfo) -> None: ...
    def on_iteration(self, stats: IterationStats) -> None: ...
    def on_epoch(self, metrics: EpochMetrics) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_finish(self, result: TrainResult) -> None: ...


class TrainControl:
    """Handed to callbacks: the (unwrapped) ``model`` being trained, and
    ``request_stop()``, which ends the run at the next check with a checkpoint."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.stop_requested = False

    def request_stop(self) -> None:
        """Stop after the current iteration (within a few iterations) and write ``last``."""
        self.stop_requested = True


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


def _call(target: Any, method: str, *args: Any) -> None:
    handler = getattr(target, method, None) if target is not None else None
    if handler is not None:
        handler(*args)


# -- building ---------------------------------------------------------------


def resolve_image_size(recipe: Recipe, model_default: int | None = None) -> int:
    """The square side the run trains at: ``data.image_size``, else ``model.input_size``,
    else the data set's native size (32 for digits, synthetic and CIFAR), else the model's default."""
    for size in (recipe.data.image_size, recipe.model.input_size, native_image_size(recipe.data), model_default):
        if size:
            return int(size)
    return 224


def create_for_recipe(recipe: Recipe, num_classes: int | None = None) -> nn.Module:
    """The recipe's model before conversion (``pretrained`` as the recipe says)."""
    classes = num_classes or recipe.model.num_classes
    return create_model(recipe.model.name, source=recipe.model.source, num_classes=classes, pretrained=recipe.model.pretrained)


def convert_for_recipe(recipe: Recipe, model: nn.Module) -> ConversionReport | None:
    """Convert ``model`` in place with the recipe's settings; None (untouched) when ``convert.enabled`` is false."""
    if not recipe.convert.enabled:
        return None
    return convert(model, **recipe.convert.model_dump(exclude={"enabled"}))


def build_model(recipe: Recipe, num_classes: int | None = None) -> tuple[nn.Module, ConversionReport | None]:
    """Build the recipe's model and convert it unless ``convert.enabled`` is false."""
    model = create_for_recipe(recipe, num_classes)
    return model, convert_for_recipe(recipe, model)


class _SkipFirst(Sampler[int]):
    """Yield a sampler's indices after skipping the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker start-up: leave Ctrl-C to the main process.

    A terminal's Ctrl-C reaches every process of the foreground group; a
    worker killed by it would break the clean stop the main process is
    making (finish the iteration, write a checkpoint).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def iterations_per_epoch(train_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: full global batches only (the last partial one is dropped)."""
    return (train_samples // world_size) // (batch_size // world_size)


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


# -- the run ----------------------------------------------------------------


class _Run:
    def __init__(self, recipe: Recipe, processes: Processes, reporter: Any, callbacks: Sequence[Any]) -> None:
        self.recipe = recipe
        self.p = processes
        self.reporter = reporter if processes.main else None
        self.callbacks = list(callbacks)
        self.control = TrainControl()
        self.output = Path(recipe.output.directory).expanduser()
        self.start_time = time.perf_counter()
        self.metrics: list[EpochMetrics] = []
        self.best_top1: float | None = None
        self.wall_before = 0.0  # wall seconds spent before a resume

    # set-up ------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        recipe, t = self.recipe, self.recipe.train
        self.checkpoint: Checkpoint | None = None
        existing = find_checkpoint(self.output / "last")
        if resume:
            if existing is None:
                raise CheckpointError(f"{self.output}: no checkpoint to resume (expected {self.output / 'last'}/)")
            self.checkpoint = read_checkpoint(existing)
            self._check_same_recipe(self.checkpoint.state.get("recipe", {}))
        elif existing is not None:
            raise CheckpointError(
                f"{self.output} already holds a run's checkpoint; pass --resume to continue it, "
                f"or choose a new output.directory (--set output.directory=...)"
            )
        if t.sync_batchnorm and self.p.distributed and self.p.device.type != "cuda":
            raise DGCConvertError(
                "train.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm runs on CUDA only; set it false on CPU"
            )
        if t.batch_size % self.p.world_size:
            raise DGCConvertError(
                f"train.batch_size={t.batch_size} does not split evenly over {self.p.world_size} processes"
            )

        # The model gets the data set's class count; build_data refuses a recipe whose model.num_classes disagrees.
        classes = recipe.model.num_classes or dataset_classes(recipe.data)
        self.model = create_for_recipe(recipe, classes)
        self.image_size = resolve_image_size(recipe, self.model.dgc_model_info.input_size[-1])
        self.dense_macs = count_macs(self.model, self.image_size).total_macs  # before conversion: the baseline
        self.report = convert_for_recipe(recipe, self.model)
        self.data = build_data(recipe.data, image_size=self.image_size, num_classes=classes, seed=t.seed, model=self.model)

        self.model.to(self.p.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if t.sync_batchnorm and self.p.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.dgc = [layer for _, layer in dgc_layers(self.model)]  # found once; the loop touches them every step
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(self.p.device.type, enabled=t.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.local_batch = t.batch_size // self.p.world_size
        self.sampler = DistributedSampler(
            self.data.train, num_replicas=self.p.world_size, rank=self.p.rank, shuffle=True, seed=t.seed, drop_last=True
        )
        per_epoch = len(self.sampler) // self.local_batch
        if per_epoch < 1:
            raise DGCConvertError(
                f"train.batch_size={t.batch_size} is larger than the {len(self.data.train)} training samples of "
                f"data.dataset={recipe.data.dataset}"
            )
        self.schedule = Schedule(t.epochs, per_epoch, t.lr, t.warmup_fraction, t.finetune_fraction, t.zeta_ramp)
        self.epochs_done, self.iteration, self.epoch_iteration = 0, 0, 0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        else:
            # Fresh run: the model was initialised from the run's seed (train() seeds
            # first); now give each rank its own stream (dropout, ...), reproducibly.
            torch.manual_seed(t.seed + self.p.rank)
        self.train_model: nn.Module = self.model
        self.control.model = self.model
        if self.p.distributed:
            ids = [self.p.device.index] if self.p.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _check_same_recipe(self, saved: dict) -> None:
        current = self.recipe.model_dump(mode="json")
        differences = _recipe_differences(saved, current)
        if differences:
            key, old, new = differences[0]
            raise CheckpointError(
                f"{self.output}: the recipe differs from the checkpoint's at {key} ({old!r} there, {new!r} now); "
                f"resume with the same recipe, or train into a new output.directory"
            )

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.recipe.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(
            params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0, weight_decay=t.weight_decay
        )

    # checkpoints ---------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        cpu = torch.get_rng_state()
        states = {"python": random.getstate()}
        if self.p.distributed:
            gathered = [torch.empty_like(cpu) for _ in range(self.p.world_size)]
            if self.p.device.type == "cuda":
                buffers = [g.to(self.p.device) for g in gathered]
                dist.all_gather(buffers, cpu.to(self.p.device))
                gathered = [b.cpu() for b in buffers]
            else:
                dist.all_gather(gathered, cpu)
            states["torch_cpu"] = gathered
        else:
            states["torch_cpu"] = [cpu]
        if self.p.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.p.device)
            if self.p.distributed:
                buffers = [torch.empty_like(cuda).to(self.p.device) for _ in range(self.p.world_size)]
                dist.all_gather(buffers, cuda.to(self.p.device))
                states["torch_cuda"] = [b.cpu() for b in buffers]
            else:
                states["torch_cuda"] = [cuda]
        return states

    def _state(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "recipe": self.recipe.model_dump(mode="json"),
            "epochs_completed": self.epochs_done,
            "iteration": self.iteration,
            "epoch_iteration": self.epoch_iteration,
            "iterations_per_epoch": self.schedule.iterations_per_epoch,
            "total_iterations": self.schedule.total_iterations,
            "progress": self.schedule.progress(self.iteration),
            "zeta_fraction": self._zeta_fraction,
            "zeta_t": {name: layer.zeta_t_value for name, layer in dgc_layers(self.model)},
            "image_size": self.image_size,
            "num_classes": self.data.num_classes,
            "world_size": self.p.world_size,
            "best_top1": self.best_top1,
            "metrics": asdict(self.metrics[-1]) if self.metrics else None,
            "wall_seconds": self._wall(),
        }

    def save_last(self, status: str) -> None:
        # Every rank takes part in gathering generator states; rank 0 writes.
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng_state(),
        }
        if self.p.main:
            with self.signals.held():
                save_checkpoint(self.output / "last", model=self.model, state=self._state(status), training_state=training_state)
        self.p.barrier()

    def _save_best(self) -> None:
        if self.p.main:
            with self.signals.held():
                save_checkpoint(self.output / "best", model=self.model, state=self._state("best"))

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        if state.get("iterations_per_epoch") != self.schedule.iterations_per_epoch:
            raise CheckpointError(
                f"{checkpoint.directory}: saved with {state.get('iterations_per_epoch')} iterations per epoch, now "
                f"{self.schedule.iterations_per_epoch} (different data or process count); cannot resume exactly"
            )
        checkpoint.load_weights(self.model, device="cpu")
        self.model.to(self.p.device)
        training = checkpoint.training_state()
        optimizer_state = training["optimizer"]
        optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
        self.optimizer.load_state_dict(optimizer_state)
        if training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        self.epochs_done = int(state["epochs_completed"])
        self.iteration = int(state["iteration"])
        self.epoch_iteration = int(state["epoch_iteration"])
        self.best_top1 = state.get("best_top1")
        self.wall_before = float(state.get("wall_seconds") or 0.0)
        rng = training["rng"]
        cpu_states = rng["torch_cpu"]
        same_world = len(cpu_states) == self.p.world_size
        if same_world:
            torch.set_rng_state(cpu_states[self.p.rank])
            if self.p.device.type == "cuda" and "torch_cuda" in rng:
                torch.cuda.set_rng_state(rng["torch_cuda"][self.p.rank], self.p.device)
            python = rng["python"]
            random.setstate((python[0], tuple(python[1]), python[2]))
        else:
            torch.manual_seed(self.recipe.train.seed + self.p.rank + 7919 * self.iteration)
            _call(self.reporter, "on_message", f"resuming on {self.p.world_size} processes, saved on {len(cpu_states)}: "
                  "random streams are reseeded, so the result will not match an uninterrupted run bit for bit")
        self._read_metrics()

    def _read_metrics(self) -> None:
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("epoch", 0) <= self.epochs_done:
                kept.append(row)
        self.metrics = [EpochMetrics(**row) for row in kept if set(row) == set(EpochMetrics.__dataclass_fields__)]
        if self.p.main:
            # Epochs after the checkpoint will run again; drop their old lines.
            path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    # the loop ------------------------------------------------------------
    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start_time

    @property
    def _zeta_fraction(self) -> float:
        return self.schedule.zeta_fraction(self.iteration)

    def _apply_schedule(self) -> float:
        fraction = self._zeta_fraction
        if fraction != getattr(self, "_applied_fraction", None):
            set_zeta(self.dgc, fraction=fraction)
            self._applied_fraction = fraction
        lr = self.schedule.lr(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _mean_zeta_t(self) -> float:
        # The cached floats: reading the buffers would sync a GPU once per layer.
        return sum(layer.zeta_t_value for layer in self.dgc) / len(self.dgc) if self.dgc else 0.0

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.recipe.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.p.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.data.train.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.recipe.train.seed * 100_003 + epoch)
        return DataLoader(
            self.data.train,
            batch_size=self.local_batch,
            sampler=_SkipFirst(self.sampler, skip_batches * self.local_batch),
            drop_last=True,
            num_workers=self.recipe.train.num_workers,
            pin_memory=self.p.device.type == "cuda",
            generator=generator,  # keeps the global stream untouched and worker seeds reproducible
            worker_init_fn=_ignore_interrupts,
        )

    def _agree(self, nonfinite: Tensor) -> tuple[bool, bool]:
        """All ranks learn whether any rank wants to stop or saw a non-finite loss."""
        stop, bad = self.p.all_reduce([float(self.control.stop_requested), float(nonfinite.item())], dist.ReduceOp.MAX if self.p.distributed else None)
        return stop > 0, bad > 0

    def _diverged(self) -> TrainingDiverged:
        last = find_checkpoint(self.output / "last")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return TrainingDiverged(
            f"loss became non-finite at epoch {self.epochs_done + 1}, iteration {self.iteration} "
            f"(lr {self.schedule.lr(self.iteration):.4g}, zeta_t {self._mean_zeta_t():.3f}); stopped, {kept}. "
            f"Try a lower train.lr or train.amp=off"
        )

    def run(self) -> TrainResult:
        t = self.recipe.train
        schedule = self.schedule
        self.signals = StopSignals(
            self.control, None if self.reporter is None else lambda text: _call(self.reporter, "on_message", text)
        )
        with self.signals:
            if self.p.main:
                self.output.mkdir(parents=True, exist_ok=True)
                (self.output / "recipe.yaml").write_text(
                    yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
                )
            set_zeta(self.dgc, fraction=1.0)
            target_macs = count_macs(self.model, self.image_size).total_macs
            _call(self.reporter, "on_start", RunInfo(
                model=self.recipe.model.name, dataset=self.recipe.data.dataset, output_dir=self.output,
                image_size=self.image_size, num_classes=self.data.num_classes, train_samples=len(self.data.train),
                val_samples=len(self.data.val), epochs=t.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
                start_epoch=self.epochs_done, start_iteration=self.iteration, world_size=self.p.world_size,
                device=str(self.p.device), converted_layers=len(self.report.converted) if self.report else 0,
                dense_macs=self.dense_macs, target_macs=target_macs,
                stages=[asdict(s) for s in schedule.stages()],
            ))
            self._applied_fraction = None
            status: Literal["finished", "interrupted"] = "finished"
            while self.epochs_done < t.epochs:
                if not self._train_epoch():
                    status = "interrupted"
                    break
            set_zeta(self.dgc, fraction=self._zeta_fraction)
            result = TrainResult(
                status=status, output_dir=self.output, epochs_completed=self.epochs_done, iteration=self.iteration,
                total_iterations=schedule.total_iterations, metrics=self.metrics, best_top1=self.best_top1,
                wall_seconds=self._wall(), model=self.model,
            )
            _call(self.reporter, "on_finish", result)
            return result

    def _train_epoch(self) -> bool:
        """Train one epoch (or its remainder); False when stopped early with a checkpoint."""
        t, schedule = self.recipe.train, self.schedule
        epoch = self.epochs_done
        per_epoch = schedule.iterations_per_epoch
        loader = self._loader(epoch, self.epoch_iteration)
        self.train_model.train()
        device = self.p.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        sparsity_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        nonfinite = torch.zeros((), device=device, dtype=torch.bool)
        seen = 0
        epoch_start = time.perf_counter()
        lr = schedule.lr(self.iteration)
        for images, labels in loader:
            lr = self._apply_schedule()
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.train_model(images)
                loss = self.criterion(logits, labels)
                if self.dgc and t.sparsity_lambda > 0:
                    sparsity = sparsity_loss(self.dgc)
                    loss = loss + t.sparsity_lambda * sparsity
                    sparsity_sum += sparsity.detach().double()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach().double() * labels.shape[0]
            nonfinite |= ~torch.isfinite(loss.detach())
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            self.iteration += 1
            self.epoch_iteration += 1
            for callback in self.callbacks:
                _call(callback, "on_iteration_end", self.control, self.iteration)
            if self.epoch_iteration % _CHECK_EVERY == 0 or self.epoch_iteration == per_epoch:
                stop, bad = self._agree(nonfinite)
                if bad:
                    raise self._diverged()
                elapsed = time.perf_counter() - epoch_start
                _call(self.reporter, "on_iteration", IterationStats(
                    epoch=epoch + 1, epoch_iteration=self.epoch_iteration, iterations_per_epoch=per_epoch,
                    iteration=self.iteration, loss=loss_sum.item() / max(seen, 1),
                    train_top1=100.0 * correct.item() / max(seen, 1), zeta_t=self._mean_zeta_t(), lr=lr,
                    images_per_second=seen * self.p.world_size / max(elapsed, 1e-9),
                ))
                if stop and self.epoch_iteration < per_epoch:
                    self.save_last("interrupted")
                    return False
        train_seconds = time.perf_counter() - epoch_start
        self._average_norm_statistics()
        self.epochs_done += 1
        self.epoch_iteration = 0
        totals = self.p.all_reduce([loss_sum.item(), correct.item(), seen, sparsity_sum.item()])
        metrics = self._evaluate_epoch(totals, per_epoch, lr, train_seconds, epoch_start)
        self.metrics.append(metrics)
        if self.p.main:
            with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(metrics)) + "\n")
        _call(self.reporter, "on_epoch", metrics)
        if self._zeta_fraction >= 1.0 and (self.best_top1 is None or metrics.val_top1 > self.best_top1):
            self.best_top1 = metrics.val_top1
            self._save_best()
        for callback in self.callbacks:
            _call(callback, "on_epoch_end", self.control, metrics)
        stop, _ = self._agree(torch.zeros((), dtype=torch.bool))
        finished = self.epochs_done == t.epochs
        if finished or stop or self.epochs_done % t.checkpoint_every == 0:
            self.save_last("finished" if finished else ("interrupted" if stop else "running"))
        return finished or not stop

    @torch.no_grad()
    def _average_norm_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks, so every rank evaluates
        and would save the same model (each rank's stats saw only its own batches)."""
        if not self.p.distributed:
            return
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var):
                    if buffer is not None:
                        dist.all_reduce(buffer)
                        buffer /= self.p.world_size

    @torch.no_grad()
    def _evaluate_epoch(self, totals: list[float], per_epoch: int, lr: float, train_seconds: float, epoch_start: float) -> EpochMetrics:
        # Evaluate at the ratio the next iteration would use (the target after the last one).
        self._apply_schedule()
        val_loss, top1, top5 = self._evaluate()
        macs = count_macs(self.model, self.image_size).total_macs
        loss_total, correct, seen, sparsity = totals
        return EpochMetrics(
            epoch=self.epochs_done, iteration=self.iteration, progress=self.schedule.progress(self.iteration),
            stage=self.schedule.stage(max(self.iteration - 1, 0)), lr=lr, zeta_t=self._mean_zeta_t(),
            train_loss=loss_total / max(seen, 1), train_top1=100.0 * correct / max(seen, 1),
            sparsity=sparsity / per_epoch / self.p.world_size, val_loss=val_loss, val_top1=top1, val_top5=top5,
            macs=macs, dense_macs=self.dense_macs, images_per_second=seen / max(train_seconds, 1e-9),
            epoch_seconds=time.perf_counter() - epoch_start, wall_seconds=self._wall(),
        )

    def _evaluate(self) -> tuple[float, float, float | None]:
        """Held-out loss and top-1 / top-5 (percent), each rank scoring its own share."""
        model = self.model
        was_training = model.training
        model.eval()
        indices = list(range(self.p.rank, len(self.data.val), self.p.world_size))
        loader = DataLoader(Subset(self.data.val, indices), batch_size=max(self.local_batch, 64), shuffle=False,
                            num_workers=self.recipe.train.num_workers, pin_memory=self.p.device.type == "cuda",
                            worker_init_fn=_ignore_interrupts)
        scores = score(model, loader, device=self.p.device, channels_last=self.recipe.train.channels_last,
                       autocast=self._autocast)
        model.train(was_training)
        totals = self.p.all_reduce([scores.loss_sum, scores.top1, scores.top5, scores.count])
        return Scores(*totals, classes=self.data.num_classes).percentages()


def train(
    recipe: Recipe | dict,
    *,
    resume: bool = False,
    reporter: TrainReporter | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train the recipe's model from scratch (or ``resume`` its ``last`` checkpoint).

    Args:
        recipe: a ``Recipe`` (or a mapping validated as one).
        resume: continue from ``output.directory/last``; the recipe must match
            the checkpoint's (output directory, workers and checkpoint interval
            may differ).
        reporter: receives progress on rank 0 (see ``TrainReporter``).
        callbacks: objects with optional ``on_iteration_end(control, iteration)``
            and ``on_epoch_end(control, metrics)``, called on every rank;
            ``control.request_stop()`` ends the run with a checkpoint.

    Returns:
        A ``TrainResult``; ``status`` is ``interrupted`` when a signal or a
        callback stopped the run (``last`` holds where it stopped).

    Raises:
        TrainingDiverged: the loss became non-finite.
        DGCConvertError: bad recipe values, data or checkpoints (one-line messages).
    """
    if not isinstance(recipe, Recipe):
        recipe = recipe_from_dict(recipe)
    processes = Processes.from_env()
    try:
        with _determinism(recipe.train.seed, recipe.train.deterministic):
            run = _Run(recipe, processes, reporter, callbacks)
            run.setup(resume)
            return run.run()
    finally:
        processes.close()
