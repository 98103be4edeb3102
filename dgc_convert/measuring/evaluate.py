"""Evaluate a model on a data set: top-1/top-5 accuracy, and the MACs per sample it really spent.

The realised count takes, per sample and head, the kept channels with a nonzero score, so it is
at most the static count (head-wise); non-finite outputs count as misses.
``docs/measuring.md``, "Realised MACs in evaluation", gives the rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dgc_convert.conversion.surgery import dgc_layers
from dgc_convert.measuring.macs import count_macs, dgc_layer_costs
from dgc_convert.measuring.memory import require_batch_memory
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import watch_scores
from dgc_convert.progress import NO_PROGRESS, Progress, tracked

__all__ = ["EvalReport", "LayerUsage", "Scores", "evaluate", "score", "kept_nonzero", "realised_layer_macs"]

_PERCENTILES = (5, 50, 95)


def kept_nonzero(layer: DGCConv2d, scores: Tensor) -> Tensor:
    """(batch, heads): kept channels with a nonzero score (head-wise ``min(k, #scores > 0)``)."""
    return (layer.selection_mask(scores) & scores.gt(0)).sum(dim=2)


def realised_layer_macs(
    layer: DGCConv2d, scores: Tensor, output_height: int, output_width: int, kept: Tensor | None = None
) -> Tensor:
    """MACs per sample a DGC layer really spends: (batch,) from its scores (batch, heads, C).

    Saliency costs as in the static count; the convolution costs, per head,
    ``kept nonzero channels * C'/heads * kh * kw * H' * W'``. ``kept``, when
    given, is ``kept_nonzero(layer, scores)`` already computed.
    """
    kept = kept_nonzero(layer, scores) if kept is None else kept  # (B, H)
    saliency, per_channel = dgc_layer_costs(layer, output_height, output_width)
    return kept.sum(dim=1).double() * per_channel + saliency


@dataclass
class LayerUsage:
    """One DGC layer over the data set: static and realised MACs per sample, and how full its heads were."""

    name: str
    static_macs: int
    realised_mean: float
    realised_percentiles: dict[str, float]
    nonzero_kept_fraction: float  # mean over samples and heads of (nonzero kept channels / k)


@dataclass
class EvalReport:
    """Accuracy (percent) and MACs per sample (static, and realised: mean and percentiles)."""

    samples: int
    top1: float
    top5: float | None
    loss: float
    static_macs: int
    realised_mean: float
    realised_percentiles: dict[str, float]
    layers: list[LayerUsage] = field(default_factory=list)
    nonfinite_samples: int = 0  # samples with a NaN or infinite output: misses, and the loss is not finite

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def _percentiles(values: Tensor) -> dict[str, float]:
    q = torch.tensor([p / 100 for p in _PERCENTILES], dtype=values.dtype)
    return {f"p{p}": float(v) for p, v in zip(_PERCENTILES, torch.quantile(values, q))}


@dataclass
class Scores:
    """Classification counts over some batches: summed loss, top-1 and top-5 hits, samples, classes,
    and the samples with a NaN or infinite output (counted as misses)."""

    loss_sum: float = 0.0
    top1: int = 0
    top5: int = 0
    count: int = 0
    classes: int = 0
    nonfinite: int = 0

    def percentages(self) -> tuple[float, float, float | None]:
        """(mean loss, top-1 %, top-5 % or None with 5 classes or fewer)."""
        count = max(self.count, 1)
        top5 = 100.0 * self.top5 / count if self.classes > 5 else None
        return self.loss_sum / count, 100.0 * self.top1 / count, top5


def move_batch(
    batch: tuple[Tensor, Tensor], device: str | torch.device, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """(images, labels) on ``device``, images channels-last when asked (how training and scoring feed a model)."""
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Scores:
    """Run ``model`` (as it is: set eval mode first) over (images, labels) batches and count hits."""
    scores = Scores()
    for batch in batches:
        images, labels = move_batch(batch, device, channels_last)
        with autocast():
            logits = model(images)
        scores.loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        # topk ranks NaN above every number: a sample with a non-finite output is a miss, not a lucky hit.
        finite = torch.isfinite(logits).all(dim=1)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        scores.top1 += ((ranked[:, 0] == labels) & finite).sum().item()
        scores.top5 += ((ranked == labels[:, None]).any(1) & finite).sum().item()
        scores.nonfinite += int((~finite).sum().item())
        scores.count += labels.shape[0]
        scores.classes = logits.shape[1]
    return scores


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    input_size: tuple[int, int, int] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress = NO_PROGRESS,
) -> EvalReport:
    """Top-1/top-5 (top-5 with more than 5 classes) and static vs realised MACs per sample on ``dataset``.

    ``progress`` is told each step and each batch (see ``dgc_convert.progress``).
    """
    model = model.to(device).eval()
    layers = dgc_layers(model)
    realised: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    fullness: dict[str, list[Tensor]] = {name: [] for name, _ in layers}

    def count(name: str, layer: DGCConv2d, scores: Tensor, out: Tensor) -> None:
        kept = kept_nonzero(layer, scores)
        realised[name].append(realised_layer_macs(layer, scores, out.shape[2], out.shape[3], kept).cpu())
        fullness[name].append((kept.float() / layer.kept_channels).mean(1).cpu())

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the data set is empty")
    progress.step("counting static MACs per sample")
    static = count_macs(model, input_size or tuple(dataset[0][0].shape))
    require_batch_memory(static, min(batch_size, len(dataset)), what="evaluating", device=device)  # type: ignore[arg-type]
    with watch_scores(layers, count):
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        counts = score(model, tracked(batches, progress, "evaluating (batches)"), device=device)
    seen = counts.count
    static_by_name = static.by_name()
    rows, dgc_static = [], 0
    total_realised = torch.zeros(seen, dtype=torch.float64)
    for name, _ in layers:
        values = torch.cat(realised[name])
        total_realised += values
        layer_static = static_by_name[name].macs
        dgc_static += layer_static
        rows.append(
            LayerUsage(
                name, layer_static, float(values.mean()), _percentiles(values), float(torch.cat(fullness[name]).mean())
            )
        )
    total = total_realised + (static.total_macs - dgc_static)
    loss, top1, top5 = counts.percentages()
    return EvalReport(
        samples=seen,
        top1=top1,
        top5=top5,
        loss=loss,
        static_macs=static.total_macs,
        realised_mean=float(total.mean()),
        realised_percentiles=_percentiles(total),
        layers=rows,
        nonfinite_samples=counts.nonfinite,
    )
