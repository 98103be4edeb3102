"""The figure of ``dgc-convert bench --plot``: per-layer times of the dense and the DGC model."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dgc_convert.errors import DGCConvertError
from dgc_convert.files.plots import new_figure, save_png
from dgc_convert.measuring.bench import BenchResult

__all__ = ["draw_bench_layers", "write_bench_layers"]


def draw_bench_layers(result: BenchResult) -> Figure:
    """Horizontal bars per convolution, in network order: the dense model's median milliseconds
    per batch beside the DGC model's, the DGC layers' bar split into convolution (and the
    rest), saliency and top-k. Width 9 inches, height grows with the layer count."""
    rows = result.layers
    if not rows:
        raise DGCConvertError(f"{result.model}: no per-layer timings to plot")
    figure = new_figure((9.0, 1.8 + 0.3 * len(rows)))
    axis = figure.subplots()
    positions = range(len(rows))
    bar = 0.4
    dense_y = [y - bar / 2 for y in positions]
    dgc_y = [y + bar / 2 for y in positions]
    axis.barh(dense_y, [row.dense_ms for row in rows], height=bar, color="C0")
    rest = [row.conv_ms if row.conv_ms is not None else row.dgc_ms for row in rows]
    saliency = [row.saliency_ms or 0.0 for row in rows]
    select = [row.select_ms or 0.0 for row in rows]
    axis.barh(dgc_y, rest, height=bar, color="C1")
    axis.barh(dgc_y, saliency, height=bar, left=rest, color="C2")
    axis.barh(dgc_y, select, height=bar, left=[a + b for a, b in zip(rest, saliency)], color="C3")
    axis.set_yticks(list(positions))
    axis.set_yticklabels(
        [f"{row.name} ({row.mac_ratio:.0%} MACs)" if row.saliency_ms is not None else row.name for row in rows],
        fontsize=8,
    )
    axis.invert_yaxis()  # the first layer on top
    axis.set_xlabel("median ms per batch (eager models)")
    axis.grid(True, axis="x", alpha=0.3)
    c, h, w = result.input_size
    axis.set_title(
        f"{result.model}: batch {result.batch_size}, input {c}x{h}x{w}, {result.threads} threads\n"
        f"whole model: dense {result.dense_ms:.2f} ms ({result.dense_engine}), "
        f"DGC {result.dgc_ms:.2f} ms ({result.dgc_engine}), speed-up {result.speedup:.2f}x",
        fontsize=10,
    )
    figure.legend(
        handles=[
            Patch(color="C0", label=f"dense ({result.dense_layout})"),
            Patch(color="C1", label="DGC model: convolution and the rest"),
            Patch(color="C2", label="DGC layer: saliency"),
            Patch(color="C3", label="DGC layer: top-k"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=8,
    )
    return figure


def write_bench_layers(result: BenchResult, path: str | Path) -> Path:
    """``draw_bench_layers`` into a PNG at ``path`` (100 pixels per inch), atomically."""
    return save_png(draw_bench_layers(result), path, dpi=100)
