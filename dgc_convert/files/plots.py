"""Training curves of one run or several, and the two helpers every figure of ours is drawn with
(``new_figure``, ``save_png``: bench's layers and ``inspect``'s heat maps use them too).

Figures are ``matplotlib.figure.Figure`` objects on their own Agg canvas, never
pyplot's: no global state (a notebook that calls ``train`` gets no stray
figures), no window, and no backend switch for the caller. PNGs are written
atomically: into a temporary file beside the target, then renamed over it,
so a crash mid-write never leaves half a picture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dgc_convert.errors import DGCConvertError
from dgc_convert.files.atomic import atomic_write
from dgc_convert.files.names import METRICS_FILE, RECIPE_FILE

__all__ = [
    "CURVES_DPI",
    "CURVES_SIZE",
    "RunCurves",
    "new_figure",
    "save_png",
    "read_metrics",
    "read_run",
    "read_runs",
    "draw_curves",
    "write_curves",
]

CURVES_SIZE = (10.0, 7.0)  # inches: the curves are 1000 x 700 pixels at CURVES_DPI
CURVES_DPI = 100  # pixels per inch

# Line styles say which split a curve belongs to; colours say which run.
LineStyle = Literal["-", "--", ":"]
_HELD_OUT: LineStyle = "-"
_TRAIN: LineStyle = "--"
_REFERENCE: LineStyle = ":"  # a fixed figure to compare with (the dense MACs)
# A loss more than this many times the median of the panel's losses is left off its scale (and named).
_LOSS_OUTLIER = 100.0


def new_figure(size: tuple[float, float], *, layout: Literal["constrained", "tight"] | None = "constrained") -> Figure:
    """A figure of ``size`` (width, height in inches) on its own Agg canvas (files only, no pyplot).

    ``layout`` is matplotlib's layout engine ("constrained", "tight" or None).
    """
    figure = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg
    return figure


def save_png(figure: Figure, path: str | Path, *, dpi: float = CURVES_DPI) -> Path:
    """Write ``figure`` as a PNG at ``dpi`` pixels per inch, atomically; returns the path.

    The picture goes to a temporary file in the target's directory (created
    if missing), is flushed to disk, then renamed over ``path``: readers see
    the old picture or the new one, never a part of one.
    """
    path = Path(path)
    with atomic_write(path) as temporary, open(temporary, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path


# -- training curves --------------------------------------------------------


@dataclass
class RunCurves:
    """One run's epochs, as ``metrics.jsonl`` holds them, and the label its lines carry.

    ``rows`` are dicts of ``EpochMetrics`` fields in epoch order (a field a row
    lacks is left out of its panel); ``kind`` is "DGC" or "dense" when the
    run's recipe says so.
    """

    label: str
    rows: list[dict[str, Any]]
    kind: str | None = None

    @property
    def final_top1(self) -> float | None:
        """The last epoch's held-out top-1 (percent), if recorded."""
        value = self.rows[-1].get("val_top1") if self.rows else None
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def summary(self) -> str:
        """One line: label, epochs, the last held-out top-1 and the run's wall-clock seconds."""
        epochs = len(self.rows)
        text = f"{self.label}: {epochs} epoch{'s' if epochs != 1 else ''}"
        if self.final_top1 is not None:
            text += f", held-out top-1 {self.final_top1:.2f}%"
        wall = self.rows[-1].get("wall_seconds") if self.rows else None
        if isinstance(wall, (int, float)):
            text += f", {wall:.0f} s"
        return text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of a ``metrics.jsonl`` file, one per epoch number, in epoch order.

    Lines that are not JSON objects with an ``epoch`` (a line still being
    written) are skipped; an epoch recorded twice keeps its last line.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            by_epoch[row["epoch"]] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _run_kind(directory: Path) -> str | None:
    """ "DGC" or "dense" from the run's recipe (None when it cannot tell)."""
    try:
        recipe = yaml.safe_load((directory / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    convert = recipe.get("convert") if isinstance(recipe, dict) else None
    enabled = convert.get("enabled", True) if isinstance(convert, dict) else True
    return "DGC" if enabled else "dense"


def read_run(directory: str | Path, label: str | None = None) -> RunCurves:
    """The curves of the training run whose output directory is ``directory``.

    ``label`` defaults to the directory's name and, when its ``recipe.yaml``
    says, "(DGC)" or "(dense)".

    Raises:
        DGCConvertError: the directory does not exist, or holds no epoch in ``metrics.jsonl``.
    """
    directory = Path(directory)
    metrics = directory / METRICS_FILE
    if not directory.is_dir():
        raise DGCConvertError(f"{directory}: no such directory (expected a training run's output directory)")
    if not metrics.is_file():
        raise DGCConvertError(f"{directory}: no {METRICS_FILE} (not a training run's output directory)")
    rows = read_metrics(metrics)
    if not rows:
        raise DGCConvertError(f"{metrics}: no epoch recorded yet")
    kind = _run_kind(directory)
    if label is None:
        name = directory.resolve().name
        label = f"{name} ({kind})" if kind else name
    return RunCurves(label=label, rows=rows, kind=kind)


def read_runs(directories: Sequence[str | Path]) -> list[RunCurves]:
    """``read_run`` for each directory; runs of the same name are told apart by their parent's name."""
    paths = [Path(d).resolve() for d in directories]
    names = [p.name for p in paths]
    runs = []
    for given, path in zip(directories, paths):
        run = read_run(given)
        if names.count(path.name) > 1:
            run.label = f"{path.parent.name}/{run.label}"
        runs.append(run)
    return runs


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one field, over the rows that hold a finite number for it
    (a diverged evaluation's NaN is a gap, not a point)."""
    points = [
        (row["epoch"], float(row[key]))
        for row in rows
        if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])
    ]
    return [e for e, _ in points], [v for _, v in points]


def _mac_unit(runs: Sequence[RunCurves]) -> tuple[float, str]:
    largest = max(
        (float(row.get(key) or 0) for run in runs for row in run.rows for key in ("macs", "dense_macs")), default=0.0
    )
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if largest >= scale:
            return scale, unit
    return 1.0, ""


def _line(axis: Axes, run: RunCurves, key: str, colour: str, style: LineStyle, scale: float = 1.0) -> None:
    epochs, values = _series(run.rows, key)
    if epochs:
        # Dots mark the epochs while they are few enough to tell apart; reference lines need none.
        marker = "." if len(epochs) < 30 and style != _REFERENCE else None
        axis.plot(epochs, [v / scale for v in values], style, color=colour, marker=marker)


def draw_curves(runs: Sequence[RunCurves], title: str | None = None) -> Figure:
    """Four panels against epoch: top-1 (held-out, and train), loss (log scale), mean ``zeta_t``,
    MACs per sample (with each run's dense count dotted). Colours tell runs apart;
    solid lines are held-out figures, dashed ones training figures. ``CURVES_SIZE`` inches."""
    figure = new_figure(CURVES_SIZE)
    top1, loss, zeta, macs = figure.subplots(2, 2, sharex=True).flat
    scale, unit = _mac_unit(runs)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        _line(top1, run, "val_top1", colour, _HELD_OUT)
        _line(top1, run, "train_top1", colour, _TRAIN)
        _line(loss, run, "val_loss", colour, _HELD_OUT)
        _line(loss, run, "train_loss", colour, _TRAIN)
        _line(zeta, run, "zeta_t", colour, _HELD_OUT)
        _line(macs, run, "macs", colour, _HELD_OUT, scale)
        _line(macs, run, "dense_macs", colour, _REFERENCE, scale)
    top1.set_ylabel("top-1 (%)")
    loss.set_ylabel("loss per sample")
    _fit_loss_axis(loss, runs)
    zeta.set_ylabel("mean zeta_t (pruning ratio)")
    macs.set_ylabel(f"{unit}MACs per sample")
    for axis in (top1, loss, zeta, macs):
        axis.grid(True, alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (zeta, macs):
        axis.set_xlabel("epoch")
    zeta.set_ylim(bottom=0)
    macs.set_ylim(bottom=0)
    styles = [
        Line2D([], [], color="0.3", linestyle=_HELD_OUT, label="held-out (MACs: at the epoch's zeta_t)"),
        Line2D([], [], color="0.3", linestyle=_TRAIN, label="train"),
        Line2D([], [], color="0.3", linestyle=_REFERENCE, label="dense MACs"),
    ]
    handles = [Line2D([], [], color=colour, linewidth=3, label=run.summary) for run, colour in zip(runs, colours)]
    if len(runs) == 1 and title is None:
        title = runs[0].label
    # Runs on the left, one per row (their labels are long); what the line styles mean on the right.
    figure.legend(handles=handles, loc="outside lower left", fontsize=9)
    figure.legend(handles=styles, loc="outside lower right", fontsize=9)
    if title:
        figure.suptitle(title)
    return figure


def _fit_loss_axis(axis: Axes, runs: Sequence[RunCurves]) -> None:
    """Log scale, and the top of the axis cut below outliers, each noted in the panel.

    A first epoch's held-out loss can be orders of magnitude above the rest
    (the BatchNorm statistics of a barely trained network): on its scale every
    later epoch would be one flat line at the bottom.
    """
    points = [
        (epoch, value)
        for run in runs
        for key in ("val_loss", "train_loss")
        for epoch, value in zip(*_series(run.rows, key))
    ]
    values = sorted(value for _, value in points)
    if not values or values[0] <= 0:
        return
    axis.set_yscale("log")
    median = values[len(values) // 2]
    kept = [v for v in values if v <= _LOSS_OUTLIER * median]
    outliers: dict[int, float] = {}  # epoch: its largest loss off the scale
    for epoch, value in points:
        if value > _LOSS_OUTLIER * median:
            outliers[epoch] = max(value, outliers.get(epoch, value))
    if outliers:
        axis.set_ylim(top=max(kept) * 2)
        note = ", ".join(f"epoch {epoch} ({value:.2g})" for epoch, value in sorted(outliers.items())[:4])
        axis.text(0.98, 0.97, f"off the scale: {note}", transform=axis.transAxes, ha="right", va="top", fontsize=8)


def write_curves(runs: Sequence[RunCurves], path: str | Path, title: str | None = None) -> Path:
    """``draw_curves`` into a PNG at ``path`` (``CURVES_SIZE`` inches at ``CURVES_DPI``), atomically."""
    return save_png(draw_curves(runs, title), path, dpi=CURVES_DPI)
