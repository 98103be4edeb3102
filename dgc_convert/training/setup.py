"""Everything a training run trains with, built in one place from its recipe.

``build_training(recipe, processes)`` makes the model (converted unless
``convert.enabled`` is false, with its dense MAC count taken first), the data,
optimizer, gradient scaler, loss, the sampler that splits the data over
processes and the schedule. ``iterations_per_epoch`` is the one count of
optimizer steps per epoch, shared by the trainer and ``dgc-convert recipe show``.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from dgc_convert.conversion.build import build_model
from dgc_convert.conversion.surgery import ConversionReport, LayerSettings, dgc_layers
from dgc_convert.conversion.zoo import require_model_info
from dgc_convert.errors import DGCConvertError
from dgc_convert.measuring.macs import count_macs
from dgc_convert.measuring.memory import available_memory, require_memory
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.training.data import DataBundle, build_data, dataset_classes, native_image_size
from dgc_convert.training.distributed import Processes
from dgc_convert.training.recipe import Recipe, TrainSection
from dgc_convert.training.schedule import Schedule

__all__ = [
    "TrainingSetup",
    "build_training",
    "iterations_per_epoch",
    "make_optimizer",
    "recipe_image_size",
    "resolve_image_size",
]


def iterations_per_epoch(train_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: full global batches only (the last partial one is dropped).

    ``batch_size`` is the global batch; each of ``world_size`` processes gets
    ``train_samples // world_size`` samples and ``batch_size // world_size``
    of them per step (``DistributedSampler`` with ``drop_last``).
    """
    return (train_samples // world_size) // (batch_size // world_size)


def resolve_image_size(recipe: Recipe, model_default: int | None = None) -> int:
    """The square side (pixels) the run trains at: ``data.image_size``, else ``model.input_size``,
    else the data set's native size (32 for digits, synthetic and CIFAR), else the model's default."""
    return recipe_image_size(recipe) or model_default or 224


def recipe_image_size(recipe: Recipe) -> int | None:
    """The square side (pixels) the recipe (or its data set) fixes, if any: ``resolve_image_size`` without the model."""
    for size in (recipe.data.image_size, recipe.model.input_size, native_image_size(recipe.data)):
        if size:
            return int(size)
    return None


def make_optimizer(model: nn.Module, settings: TrainSection) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov when momentum > 0) or AdamW over the trainable parameters, at ``settings.lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov and settings.momentum > 0,
        weight_decay=settings.weight_decay,
    )


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


@dataclass
class TrainingSetup:
    """What ``build_training`` made for one run (and one process of it).

    ``model`` is the unwrapped model on ``processes.device``; ``train_model``
    the one to step (DistributedDataParallel around ``model`` under torchrun,
    else ``model`` itself). ``dense_macs`` is the MAC count per sample of the
    model before conversion, at ``image_size`` pixels square. ``dgc`` lists
    the DGC layers (found once; the loop sets their ratio every step).
    """

    recipe: Recipe
    processes: Processes
    model: nn.Module
    train_model: nn.Module
    report: ConversionReport | None
    dense_macs: int
    image_size: int
    data: DataBundle
    dgc: list[DGCConv2d]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    sampler: DistributedSampler
    schedule: Schedule

    @property
    def val_samples(self) -> int:
        """Samples in the held-out set (all processes together)."""
        return len(self.data.val)  # type: ignore[arg-type]  # DataBundle.val is a plain Dataset; ours have a length

    @property
    def local_batch(self) -> int:
        """Samples per step on this process (the global batch over the process count)."""
        return self.recipe.train.batch_size // self.processes.world_size

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh context that runs the forward pass at ``train.amp``'s precision (none for ``off``)."""
        amp = self.recipe.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.processes.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def train_loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """This process's batches of ``epoch`` (0-based), after the first ``skip_batches`` (a resumed epoch).

        The shuffle and the augmentation both follow (seed, epoch), so a
        resumed epoch sees the batches the uninterrupted one would have.
        """
        self.sampler.set_epoch(epoch)
        self.data.train.set_epoch(epoch)
        t = self.recipe.train
        generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        return DataLoader(
            self.data.train,
            batch_size=self.local_batch,
            sampler=_SkipFirst(self.sampler, skip_batches * self.local_batch),
            drop_last=True,
            num_workers=t.num_workers,
            pin_memory=self.processes.device.type == "cuda",
            generator=generator,  # keeps the global stream untouched and worker seeds reproducible
            worker_init_fn=_ignore_interrupts,
        )

    def val_loader(self) -> DataLoader:
        """This process's share of the held-out set (every ``world_size``-th sample from its rank), in order."""
        p = self.processes
        indices = list(range(p.rank, self.val_samples, p.world_size))
        return DataLoader(
            Subset(self.data.val, indices),
            batch_size=max(self.local_batch, 64),
            shuffle=False,
            num_workers=self.recipe.train.num_workers,
            pin_memory=p.device.type == "cuda",
            worker_init_fn=_ignore_interrupts,
        )


def _refuse_what_cannot_fit(per_sample: int, image_size: int, settings: TrainSection, processes: Processes) -> None:
    """One line on every process, before any batch is drawn, when a training step's activations
    (``per_sample`` bytes in float32, a lower bound) exceed the memory available."""
    need = per_sample * (settings.batch_size // processes.world_size)
    if settings.amp != "off":
        need //= 2  # autocast keeps most activations in 16 bits
    if processes.device.type == "cpu":
        need *= processes.local_world_size  # the processes on one host share its memory
    available = available_memory(processes.device)
    if processes.distributed:  # every process decides alike, on the scarcest memory of them all
        (lowest,) = processes.all_reduce([math.inf if available is None else float(available)], op=dist.ReduceOp.MIN)
        available = None if math.isinf(lowest) else int(lowest)
    require_memory(
        need,
        available,
        doing=f"training at {image_size}x{image_size} with batch {settings.batch_size} on {processes.device.type} "
        "would keep at least",
        advice="lower the image size (data.image_size) or train.batch_size",
    )


def build_training(
    recipe: Recipe,
    processes: Processes,
    *,
    load_checkpoint: bool = True,
    layers: Mapping[str, LayerSettings] | None = None,
) -> TrainingSetup:
    """Build model, data, optimizer, scaler, loss, sampler and schedule for ``recipe`` on ``processes``.

    The model gets the data set's class count unless ``model.num_classes``
    says otherwise (``build_data`` refuses a disagreement), and the weights of
    ``model.checkpoint`` unless ``load_checkpoint`` is false (a resumed run,
    whose own checkpoint then replaces them). ``layers``: the DGC layers to
    build, by module name, instead of converting by ``recipe.convert`` with
    today's rules (a resumed run's saved ones, layouts included). Random
    state: seed before calling for a reproducible model.

    Raises:
        DGCConvertError: settings that cannot work here (batch not divisible
            by the process count, larger than the data, SyncBatchNorm on CPU).
    """
    t = recipe.train
    if t.sync_batchnorm and processes.distributed and processes.device.type != "cuda":
        raise DGCConvertError(
            "train.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm runs on CUDA only; set it false on CPU"
        )
    if t.batch_size % processes.world_size:
        raise DGCConvertError(
            f"train.batch_size={t.batch_size} does not split evenly over {processes.world_size} processes"
        )

    classes = recipe.model.num_classes or dataset_classes(recipe.data)
    built = build_model(
        recipe.model,
        recipe.convert,
        num_classes=classes,
        keep_dense=True,
        load_checkpoint=load_checkpoint,
        input_size=recipe_image_size(recipe),  # the layers' MACs weighed at the size the run trains at
        layers=layers,
    )
    model, dense = built.model, built.dense
    assert dense is not None  # keep_dense
    image_size = resolve_image_size(recipe, require_model_info(model).input_size[-1])
    dense_count = count_macs(dense, image_size)  # the baseline; the copy goes when this returns
    dense_macs = dense_count.total_macs
    _refuse_what_cannot_fit(dense_count.training_activations, image_size, t, processes)
    data = build_data(recipe.data, image_size=image_size, num_classes=classes, seed=t.seed, model=model)
    per_epoch = iterations_per_epoch(len(data.train), t.batch_size, processes.world_size)
    if per_epoch < 1:
        raise DGCConvertError(
            f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training samples of "
            f"data.dataset={recipe.data.dataset}"
        )

    model.to(processes.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if t.sync_batchnorm and processes.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model: nn.Module = model
    if processes.distributed:
        ids = [processes.device.index] if processes.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return TrainingSetup(
        recipe=recipe,
        processes=processes,
        model=model,
        train_model=train_model,
        report=built.report,
        dense_macs=dense_macs,
        image_size=image_size,
        data=data,
        dgc=[layer for _, layer in dgc_layers(model)],
        optimizer=make_optimizer(model, t),
        scaler=torch.amp.GradScaler(processes.device.type, enabled=t.amp == "fp16"),
        criterion=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        sampler=DistributedSampler(
            data.train,
            num_replicas=processes.world_size,
            rank=processes.rank,
            shuffle=True,
            seed=t.seed,
            drop_last=True,
        ),
        schedule=Schedule.from_train(t, per_epoch),
    )
