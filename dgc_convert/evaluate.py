"""Evaluate a model on a data set: accuracy, and the MACs it really spent.

The static MAC count assumes every head keeps ``k`` channels. At run time a
head whose saliency scores are zero for some of its kept channels multiplies
those channels by zero: they cost nothing in a gathering implementation. The
realised count takes, per sample and head, the kept channels with a nonzero
score (``min(k, #scores > 0)``), so it is at most the static count and equal
to it when every head keeps ``k`` nonzero-score channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dgc_convert.layer import DGCConv2d
from dgc_convert.macs import count_macs
from dgc_convert.surgery import dgc_layers

__all__ = ["EvalReport", "LayerUsage", "evaluate", "realised_layer_macs"]

_PERCENTILES = (5, 50, 95)


def realised_layer_macs(layer: DGCConv2d, scores: Tensor, output_height: int, output_width: int) -> Tensor:
    """MACs per sample a DGC layer really spends: (batch,) from its scores (batch, heads, C).

    Saliency costs as in the static count; the convolution costs, per head,
    ``kept nonzero channels * C'/heads * kh * kw * H' * W'``.
    """
    kh, kw = layer.kernel_size
    kept = scores.gt(0).sum(dim=2).clamp(max=layer.kept_channels)  # (B, H)
    per_channel = (layer.out_channels // layer.heads) * kh * kw * output_height * output_width
    saliency = 2 * layer.heads * layer.in_channels * layer.saliency_generator.hidden
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

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def _percentiles(values: Tensor) -> dict[str, float]:
    q = torch.tensor([p / 100 for p in _PERCENTILES], dtype=values.dtype)
    return {f"p{p}": float(v) for p, v in zip(_PERCENTILES, torch.quantile(values, q))}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, input_size: tuple[int, int, int] | None = None,
             device: str | torch.device = "cpu") -> EvalReport:
    """Top-1/top-5 (top-5 with more than 5 classes) and static vs realised MACs per sample on ``dataset``."""
    model = model.to(device).eval()
    layers = dgc_layers(model)
    realised: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    fullness: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    captured: dict[str, Tensor] = {}
    handles = []

    def keep_scores(name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            captured[name] = out.detach()
        return hook

    def count(name: str):
        def hook(module: DGCConv2d, args: Any, out: Tensor) -> None:  # returns None: the output stays as it is
            scores = captured[name]
            realised[name].append(realised_layer_macs(module, scores, out.shape[2], out.shape[3]).cpu())
            kept = scores.gt(0).sum(2).clamp(max=module.kept_channels)
            fullness[name].append((kept.float() / module.kept_channels).mean(1).cpu())
        return hook

    for name, layer in layers:
        handles.append(layer.saliency_generator.register_forward_hook(keep_scores(name)))
        handles.append(layer.register_forward_hook(count(name)))
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    shape = None
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, labels = images.to(device), labels.to(device)
            shape = shape or tuple(images.shape[1:])
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (ranked[:, 0] == labels).sum().item()
            correct5 += (ranked == labels[:, None]).any(1).sum().item()
            seen += labels.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("the data set is empty")
    static = count_macs(model, input_size or shape)
    static_by_name = static.by_name()
    rows, dgc_static = [], 0
    total_realised = torch.zeros(seen, dtype=torch.float64)
    for name, _ in layers:
        values = torch.cat(realised[name])
        total_realised += values
        layer_static = static_by_name[name].macs
        dgc_static += layer_static
        rows.append(LayerUsage(name, layer_static, float(values.mean()), _percentiles(values),
                               float(torch.cat(fullness[name]).mean())))
    total = total_realised + (static.total_macs - dgc_static)
    return EvalReport(
        samples=seen, top1=100.0 * correct1 / seen,
        top5=100.0 * correct5 / seen if getattr(logits, "shape", (0, 0))[1] > 5 else None,
        loss=loss_sum / seen, static_macs=static.total_macs, realised_mean=float(total.mean()),
        realised_percentiles=_percentiles(total), layers=rows,
    )
