"""Which input channels each head keeps, over a data set: frequencies, heat maps, collapse flags.

For every DGC layer and head, the fraction of samples in which each input
channel is kept (among the top ``k``, or above the threshold under network
gating: the paper's figure of pruning probabilities), and the fraction of
input channels the layer keeps on average. A head whose gates have collapsed is flagged: one that keeps
the same channels for every sample (no dynamic choice left), or whose scores
are all zero (it contributes nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dgc_convert.conversion.surgery import dgc_layers
from dgc_convert.files.atomic import atomic_write, make_directory
from dgc_convert.files.plots import new_figure, save_png
from dgc_convert.measuring.macs import count_macs
from dgc_convert.measuring.memory import require_batch_memory
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import watch_scores
from dgc_convert.nn.settings import DEFAULT_GATING
from dgc_convert.progress import NO_PROGRESS, Progress, tracked

__all__ = ["LayerChannelUsage", "channel_usage", "write_heatmaps", "write_summary"]


@dataclass
class LayerChannelUsage:
    """One layer: ``frequency`` (heads, in_channels) in [0, 1], and the heads flagged as collapsed.

    ``kept`` is k (under network gating, the count the threshold aims at on average).
    """

    name: str
    heads: int
    in_channels: int
    kept: int
    samples: int
    frequency: Tensor
    collapsed: list[tuple[int, str]] = field(default_factory=list)
    gating: str = DEFAULT_GATING

    @property
    def kept_fraction(self) -> float:
        """Mean fraction of the input channels a head keeps per sample (``k / C`` head-wise)."""
        return float(self.frequency.double().mean())

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON summary (frequencies rounded to 4 places)."""
        return {
            "name": self.name,
            "heads": self.heads,
            "in_channels": self.in_channels,
            "kept": self.kept,
            "gating": self.gating,
            "kept_fraction": round(self.kept_fraction, 4),
            "samples": self.samples,
            "frequency": [[round(v, 4) for v in row] for row in self.frequency.tolist()],
            "collapsed": [{"head": h, "reason": r} for h, r in self.collapsed],
        }


@torch.no_grad()
def channel_usage(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 64, progress: Progress = NO_PROGRESS
) -> list[LayerChannelUsage]:
    """Keep frequencies of every DGC layer's heads over ``dataset`` (eval mode); ``progress``
    is told each batch (see ``dgc_convert.progress``)."""
    model.eval()
    layers = dgc_layers(model)
    counts = {name: torch.zeros(layer.heads, layer.in_channels, dtype=torch.float64) for name, layer in layers}
    nonzero = {name: torch.zeros(layer.heads, dtype=torch.bool) for name, layer in layers}

    def record(name: str, layer: DGCConv2d, scores: Tensor, output: Tensor) -> None:
        counts[name] += layer.selection_mask(scores).sum(0).double().cpu()
        nonzero[name] |= scores.gt(0).any(dim=2).any(dim=0).cpu()

    if len(dataset):  # type: ignore[arg-type]
        shapes = count_macs(model, tuple(dataset[0][0].shape))
        require_batch_memory(shapes, min(batch_size, len(dataset)), what="recording the gates")  # type: ignore[arg-type]
    samples = 0
    with watch_scores(layers, record):
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, _ in tracked(batches, progress, "recording the channels each head keeps (batches)"):
            model(images)
            samples += images.shape[0]
    usage = []
    for name, layer in layers:
        frequency = (counts[name] / max(samples, 1)).float()
        collapsed = []
        for head in range(layer.heads):
            if not nonzero[name][head]:
                collapsed.append((head, "scores all zero"))
            elif (layer.thresholded or layer.kept_channels < layer.in_channels) and bool(
                ((frequency[head] == 0) | (frequency[head] == 1)).all()
            ):
                collapsed.append((head, "keeps the same channels for every sample"))
        usage.append(
            LayerChannelUsage(
                name,
                layer.heads,
                layer.in_channels,
                layer.kept_channels,
                samples,
                frequency,
                collapsed,
                layer.gating,
            )
        )
    return usage


def write_heatmaps(usage: list[LayerChannelUsage], directory: str | Path) -> list[Path]:
    """One PNG per layer: heads x input channels, colour = keep frequency. Returns the paths."""
    directory = Path(directory)
    make_directory(directory)
    paths = []
    for layer in usage:
        width = min(16.0, max(6.0, layer.in_channels / 16))
        figure = new_figure((width, 1.2 + 0.45 * layer.heads), layout="tight")
        axis = figure.subplots()
        image = axis.imshow(
            layer.frequency.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        axis.set_xlabel("input channel")
        axis.set_ylabel("head")
        axis.set_yticks(range(layer.heads))
        flags = f"; collapsed heads {[h for h, _ in layer.collapsed]}" if layer.collapsed else ""
        axis.set_title(
            f"{layer.name}: keep frequency over {layer.samples} samples "
            f"({_kept_text(layer)} of {layer.in_channels}){flags}",
            fontsize=9,
        )
        figure.colorbar(image, ax=axis, fraction=0.03, pad=0.01)
        paths.append(save_png(figure, directory / f"{layer.name.replace('.', '_')}.png", dpi=100))
    return paths


def _kept_text(layer: LayerChannelUsage) -> str:
    if layer.gating == "network":
        return f"mean kept {layer.kept_fraction * layer.in_channels:.1f}, target {layer.kept}"
    return f"k={layer.kept}"


def write_summary(usage: list[LayerChannelUsage], path: str | Path, **context: Any) -> Path:
    """The JSON summary: context (model, data), then every layer's frequencies and collapse flags."""
    path = Path(path)
    data = {
        **context,
        "layers": [layer.to_dict() for layer in usage],
        "collapsed": [{"layer": layer.name, "head": h, "reason": r} for layer in usage for h, r in layer.collapsed],
    }
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path
