"""The one place that turns results into what a person reads: rich tables or JSON."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape  # names and paths are text: "runs/[best]" is no markup
from rich.table import Table

from dgc_convert.cli.summary import ConversionSummary
from dgc_convert.nn.layer import DEFAULT_SQUEEZE_RULE

if TYPE_CHECKING:  # loaded on first use (training, progress bars); only named here
    from rich.progress import Progress, TaskID

    from dgc_convert.bench import BenchResult
    from dgc_convert.evaluate import EvalReport
    from dgc_convert.gate_usage import LayerChannelUsage
    from dgc_convert.train_events import EpochMetrics, IterationStats, RunInfo, TrainResult

__all__ = [
    "print_channel_usage",
    "format_macs",
    "print_json",
    "print_conversion",
    "print_model_list",
    "print_recipe",
    "print_bench",
    "print_evaluation",
    "error_console",
    "TrainProgress",
    "StepProgress",
]


def format_macs(macs: float) -> str:
    """A MAC count with a unit: 1.82 G, 549.3 M, 12.0 K."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


# After a DGC MAC figure of a network-gated (DGC-G) model: k varies per sample, the count is an expectation.
_EXPECTED = " expected at target"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout and nothing else (NaN and infinities become null: strict JSON)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def error_console() -> Console:
    """A console on stderr for one-line errors."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def output_console() -> Console:
    """A console on stdout; wide when writing to a file or pipe, so tables do not wrap."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_conversion(summary: ConversionSummary, console: Console | None = None) -> None:
    """Header, a table with every convolution, and the totals."""
    console = console or output_console()
    library = summary.library + (" (picked automatically)" if summary.auto_picked else "")
    c, h, w = summary.input_size
    s = summary.settings
    console.print(f"[bold]{summary.model}[/bold] from {library}, input {c}x{h}x{w}")
    console.print(
        f"heads {s['heads']}, zeta {s['zeta']:g}, squeeze ratio {s['squeeze_ratio']:g}, "
        f"min channels {s['min_channels']}, gating {s['gating']}"
        + (" (DGC-G: one model-wide threshold)" if s["gating"] == "network" else "")
        + (", pre-activation BN+ReLU" if s["preact"] else "")
        + (f", squeeze rule {s['squeeze_rule']}" if s["squeeze_rule"] != DEFAULT_SQUEEZE_RULE else "")
        + (f", include {s['include']}" if s["include"] else "")
        + (f", exclude {s['exclude']}" if s["exclude"] else "")
        + (f", overrides {list(s['overrides'])}" if s["overrides"] else "")
    )
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("layer", overflow="fold")
    table.add_column("conv", no_wrap=True)
    table.add_column("decision")
    t = summary.totals
    expected = bool(t.get("dgc_macs_expected"))
    table.add_column("dense MACs", justify="right", no_wrap=True)
    table.add_column("DGC MACs (expected)" if expected else "DGC MACs", justify="right", no_wrap=True)
    for row in summary.layers:
        if row.status == "converted":
            network = row.gating == "network"
            # Under network gating k is what the threshold aims at, not a fixed count.
            decision = f"[green]DGC{'-G' if network else ''}[/green] H{row.heads} z{row.zeta:g} k{'~' if network else ''}{row.kept}"
            decision += " preact" if row.preact else ""
        else:
            decision = f"[yellow]kept dense[/yellow]: {row.reason}"
        table.add_row(row.name, row.geometry, decision, format_macs(row.dense_macs), format_macs(row.dgc_macs))
    console.print(table)
    console.print(
        f"converted {t['converted_layers']} of {t['convolutions']} convolutions; "
        f"MACs per sample: dense {format_macs(t['dense_macs'])}, DGC {format_macs(t['dgc_macs'])}"
        f"{_EXPECTED if expected else ''} ([bold]{t['saving'] * 100:.1f}% saved[/bold]); "
        f"parameters: dense {_count(t['dense_params'])}, DGC {_count(t['dgc_params'])}"
    )
    if t.get("saves_nothing"):
        console.print(
            f"[red]the conversion saves nothing[/red]: DGC {format_macs(t['dgc_macs'])} MACs per sample against "
            f"{format_macs(t['dense_macs'])} dense at this input size"
        )
    if expected:
        console.print(
            "DGC-G: the threshold is learned in training (dgc-convert train); until then it is 0 and the "
            "model keeps every channel with a positive score, so only a trained model spends the expected MACs"
        )
    if summary.identity_max_diff is not None:
        console.print(
            f"identity check passed: max difference {summary.identity_max_diff:.2e} at zeta 0 with unit scores"
        )


def print_model_list(models: Sequence[tuple[str, str]], console: Console | None = None) -> None:
    """One model a line: name and library."""
    console = console or output_console()
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("model")
    table.add_column("library")
    for name, library in models:
        table.add_row(name, library)
    console.print(table)
    console.print(f"{len(models)} models")


def _stage_rows(stages: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    descriptions = {"warmup": "zeta_t = 0 (dense)", "ramp": "zeta_t rises to the target", "finetune": "zeta_t = target"}
    rows = []
    for s in stages:
        empty = s["first_epoch"] > s["last_epoch"]
        if empty:
            rows.append((s["stage"], "-", "(empty)", descriptions[s["stage"]]))
            continue
        epochs = (
            f"{s['first_epoch']}" if s["first_epoch"] == s["last_epoch"] else f"{s['first_epoch']}-{s['last_epoch']}"
        )
        iterations = "?" if s["start_iteration"] is None else f"{s['start_iteration']}-{s['end_iteration'] - 1}"
        rows.append((s["stage"], epochs, iterations, descriptions[s["stage"]]))
    return rows


def print_recipe(
    recipe_data: dict[str, Any],
    stages: list[dict[str, Any]],
    iterations_per_epoch: int | None,
    train_samples: int | None,
    console: Console | None = None,
    note: str | None = None,
) -> None:
    """A resolved recipe as YAML, then its three stages as epoch and iteration ranges.

    Without the data set (``train_samples`` None), iteration ranges are
    unknown and ``note`` says why; epoch ranges still hold.
    """
    import yaml

    console = console or output_console()
    console.print(yaml.safe_dump(recipe_data, sort_keys=False).rstrip(), markup=False)
    console.print()
    if train_samples is None:
        console.print(
            f"[bold]schedule[/bold]: iterations per epoch unknown until the data is there ({note})", highlight=False
        )
    else:
        total = stages[-1]["end_iteration"] if stages else 0
        console.print(
            f"[bold]schedule[/bold]: {train_samples} training samples, {iterations_per_epoch} iterations per epoch "
            f"(one process), {total} in all; epochs 1-based, iterations 0-based and inclusive",
            highlight=False,
        )
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("stage", "epochs", "iterations", "pruning ratio"):
        table.add_column(column)
    for row in _stage_rows(stages):
        table.add_row(*row)
    console.print(table)


def _epoch_line(m: EpochMetrics, total_epochs: int | None = None, expected: bool = False) -> str:
    """One finished epoch; ``expected``: a network-gated model, whose MACs are an expectation."""
    of = f"/{total_epochs}" if total_epochs else ""
    top5 = f" (top-5 {m.val_top5:.1f}%)" if m.val_top5 is not None else ""
    saving = f" (-{(1 - m.macs / m.dense_macs) * 100:.0f}%)" if m.dense_macs and m.macs < m.dense_macs else ""
    return (
        f"epoch {m.epoch}{of} {m.stage:<8} loss {m.train_loss:.4f}  train {m.train_top1:.1f}%  "
        f"val {m.val_top1:.2f}%{top5}  zeta_t {m.zeta_t:.3f}  lr {m.lr:.4g}  "
        f"{m.images_per_second:.0f} img/s  MACs {format_macs(m.macs)}{' expected' if expected else ''}{saving}  "
        f"{m.epoch_seconds:.1f} s"
    )


class TrainProgress:
    """Training reporter: rich progress bars on a terminal, plain lines otherwise.

    Bars show epoch, loss, accuracy, zeta_t, lr and images/s; each finished
    epoch leaves one line above them. Without a terminal (CI, ``| tee``) only
    the lines are written, so logs stay readable.
    """

    def __init__(self, console: Console | None = None, *, bars: bool | None = None) -> None:
        self.console = console or output_console()
        self.bars = self.console.is_terminal if bars is None else bars
        self.progress: Progress | None = None
        self.run_task: TaskID | None = None
        self.epoch_task: TaskID | None = None
        self.epochs = 0
        self.macs_expected = False  # network-gated (DGC-G) run: MAC figures are expected costs

    def on_start(self, info: RunInfo) -> None:
        """Print what the run does; open the bars."""
        self.epochs = info.epochs
        self.macs_expected = info.macs_expected
        resumed = f", resuming after iteration {info.start_iteration}" if info.start_iteration else ""
        procs = f" on {info.world_size} processes" if info.world_size > 1 else ""
        self.console.print(
            f"training [bold]{escape(info.model)}[/bold] ({info.converted_layers} DGC layers) on {info.dataset} "
            f"({info.train_samples} train / {info.val_samples} held out, {info.image_size}x{info.image_size}, "
            f"{info.num_classes} classes) on {info.device}{procs}{resumed}"
        )
        self.console.print(
            f"{info.epochs} epoch{'s' if info.epochs != 1 else ''} x {info.iterations_per_epoch} iterations; MACs per sample: dense "
            f"{format_macs(info.dense_macs)}, {'expected ' if info.macs_expected else ''}at target "
            f"{format_macs(info.target_macs)}; writing to {escape(str(info.output_dir))}"
        )
        stages = ", ".join(f"{s} {e}" for s, e, _, _ in _stage_rows(info.stages) if e != "-")
        self.console.print(f"stages by epoch: {stages}")
        if self.bars:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[figures]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            total = info.epochs * info.iterations_per_epoch
            self.run_task = self.progress.add_task("run", total=total, completed=info.start_iteration, figures="")
            self.epoch_task = self.progress.add_task(
                f"epoch {info.start_epoch + 1}/{info.epochs}",
                total=info.iterations_per_epoch,
                completed=info.start_iteration - info.start_epoch * info.iterations_per_epoch,
                figures="",
            )

    def on_iteration(self, stats: IterationStats) -> None:
        """Advance the bars with the running loss, accuracy, zeta_t, lr and images/s."""
        if self.progress is None or self.run_task is None or self.epoch_task is None:
            return
        figures = (
            f"loss {stats.loss:.4f} acc {stats.train_top1:.1f}% zeta_t {stats.zeta_t:.3f} "
            f"lr {stats.lr:.4g} {stats.images_per_second:.0f} img/s"
        )
        self.progress.update(self.run_task, completed=stats.iteration)
        self.progress.update(
            self.epoch_task,
            description=f"epoch {stats.epoch}/{self.epochs}",
            completed=stats.epoch_iteration,
            figures=figures,
        )

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """One line per finished epoch."""
        self.console.print(_epoch_line(metrics, self.epochs, self.macs_expected), markup=False, highlight=False)
        if self.progress is not None and self.epoch_task is not None:
            self.progress.reset(self.epoch_task, description=f"epoch {metrics.epoch + 1}/{self.epochs}", figures="")

    def on_message(self, text: str) -> None:
        """A note from the trainer (resuming, stopping, ...)."""
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the bars (idempotent): at the end of a run, also one that raised."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_finish(self, result: TrainResult) -> None:
        """Close the bars and sum up."""
        self.close()
        final = result.final
        if result.status == "finished":
            expected = " (expected)" if self.macs_expected else ""
            figures = (
                f": held-out top-1 {final.val_top1:.2f}% at {format_macs(final.macs)} MACs{expected}" if final else ""
            )
            best = f", best at target {result.best_top1:.2f}%" if result.best_top1 is not None else ""
            plural = "s" if result.epochs_completed != 1 else ""
            self.console.print(
                f"finished {result.epochs_completed} epoch{plural} in {result.wall_seconds:.0f} s{figures}{best}"
            )
            self.console.print(
                f"checkpoints: {result.output_dir / 'last'}, {result.output_dir / 'best'}; "
                f"metrics: {result.output_dir / 'metrics.jsonl'}",
                markup=False,
            )


class StepProgress:
    """A long command's steps as one transient rich line on stderr: a spinner, the
    step, a bar with done/total where the step counts its work, and the time spent.

    Shown only when stderr is a terminal (stdout may carry JSON, and logs stay
    clean); it disappears when the command ends, leaving only the result. Use it
    as a context manager and pass it as ``progress=`` (see ``dgc_convert.progress``).
    """

    def __init__(self, console: Console | None = None, *, show: bool | None = None) -> None:
        self.console = console or error_console()
        self.show = self.console.is_terminal if show is None else show
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.done = 0  # units of the current step
        self.total: int | None = None

    def __enter__(self) -> StepProgress:
        if self.show:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),  # paths may hold brackets
                BarColumn(),
                TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.task, self.done, self.total = None, 0, None  # ready to be entered again

    def step(self, description: str, total: int | None = None) -> None:
        """Show ``description`` in place of the previous step; a bar when ``total`` is known."""
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.done, self.total = 0, total
        # An uncounted step shows a pulsing bar and no count.
        self.task = self.progress.add_task(description, total=total, count=self._count())

    def advance(self, amount: int = 1) -> None:
        """Move the current step's bar on."""
        if self.progress is not None and self.task is not None:
            self.done += amount
            self.progress.update(self.task, advance=amount, count=self._count())

    def _count(self) -> str:
        return "" if self.total is None else f"{self.done}/{self.total}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_bench(result: BenchResult, console: Console | None = None, layer_rows: int | None = None) -> None:
    """Whole-model medians and the per-layer table of ``dgc-convert bench``."""
    console = console or output_console()
    c, h, w = result.input_size
    console.print(
        f"[bold]{escape(result.model)}[/bold], batch {result.batch_size}, input {c}x{h}x{w}, {result.threads} threads, "
        f"median of {result.repeats} interleaved runs (ms per batch)",
        highlight=False,
    )
    if result.layers:
        console.print("per layer, eager models (saliency, top-k: timed apart on the layer's input)", highlight=False)
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        columns = ("layer", "dense ms", "DGC masked ms", "DGC ms", "saliency", "top-k", "conv", "speedup")
        for column in (*columns, "MAC ratio", "realised", "algorithm"):
            table.add_column(column, justify="left" if column in ("layer", "algorithm") else "right")
        rows = result.layers if layer_rows is None else sorted(result.layers, key=lambda r: -r.dense_ms)[:layer_rows]
        for row in rows:
            table.add_row(
                row.name,
                f"{row.dense_ms:.3f}",
                f"{row.dgc_masked_ms:.3f}",
                f"{row.dgc_ms:.3f}",
                "-" if row.saliency_ms is None else f"{row.saliency_ms:.3f}",
                "-" if row.select_ms is None else f"{row.select_ms:.3f}",
                "-" if row.conv_ms is None else f"{row.conv_ms:.3f}",
                f"{row.speedup:.2f}",
                f"{row.mac_ratio:.2f}",
                _ratio(row.realized_fraction),
                row.algorithm or "dense",
            )
        console.print(table)
    compiled = "" if result.dense_compiled_ms is None else f", compiled {result.dense_compiled_ms:.2f} ms"
    dgc_other = ""
    if result.dgc_compiled_ms is not None:
        dgc_other = f" (eager {result.dgc_eager_ms:.2f} ms, compiled {result.dgc_compiled_ms:.2f} ms)"
    console.print(
        f"dense: eager {result.dense_eager_ms:.2f} ms ({result.dense_layout}){compiled}; "
        f"DGC computed densely {result.dgc_masked_ms:.2f} ms{dgc_other}",
        highlight=False,
    )
    if result.dense_compile_s is not None and result.dgc_compile_s is not None:
        console.print(
            f"first call (compiling): dense {result.dense_compile_s:.1f} s, DGC {result.dgc_compile_s:.1f} s; "
            f"DGC layers in the compiled model: {result.dgc_in_graph}",
            highlight=False,
        )
    realised = "-" if result.realized_fraction is None else f"{result.realized_fraction * 100:.0f}%"
    console.print(
        f"fastest dense {result.dense_ms:.2f} ms ({result.dense_engine}), DGC inference path {result.dgc_ms:.2f} ms "
        f"({result.dgc_engine}): [bold]{result.speedup:.2f}x[/bold] dense speed at {result.mac_ratio:.2f} of its MACs",
        highlight=False,
    )
    console.print(
        f"{realised} of the theoretical saving realised ({format_macs(result.dgc_macs)}"
        f"{_EXPECTED if result.dgc_macs_expected else ''} vs {format_macs(result.dense_macs)} MACs per sample)",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)


def print_evaluation(
    report: EvalReport, name: str, dataset: str, console: Console | None = None, *, expected: bool = False
) -> None:
    """Accuracy, static vs realised MACs per sample, and the per-layer table of ``dgc-convert eval``.

    ``expected``: a network-gated (DGC-G) model, whose static figure is the cost expected at the target.
    """
    console = console or output_console()
    top5 = f" (top-5 {report.top5:.2f}%)" if report.top5 is not None else ""
    console.print(
        f"[bold]{escape(name)}[/bold] on {dataset}: {report.samples} samples, top-1 {report.top1:.2f}%{top5}, "
        f"loss {report.loss:.4f}",
        highlight=False,
    )
    if report.layers:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        for column in ("layer", "static MACs", "realised mean", "p5", "p95", "nonzero kept"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in report.layers:
            p = row.realised_percentiles
            table.add_row(
                row.name,
                format_macs(row.static_macs),
                format_macs(row.realised_mean),
                format_macs(p["p5"]),
                format_macs(p["p95"]),
                f"{row.nonzero_kept_fraction * 100:.1f}%",
            )
        console.print(table)
    p = report.realised_percentiles
    console.print(
        f"MACs per sample: static {format_macs(report.static_macs)}{_EXPECTED if expected else ''}, "
        f"realised mean {format_macs(report.realised_mean)} "
        f"(p5 {format_macs(p['p5'])}, median {format_macs(p['p50'])}, p95 {format_macs(p['p95'])})",
        highlight=False,
    )


def print_channel_usage(usage: list[LayerChannelUsage], console: Console | None = None) -> None:
    """Per layer of ``dgc-convert inspect``: gating, channels kept per head on average (of C), and k."""
    console = console or output_console()
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("layer", "gating", "in channels", "kept per head", "kept fraction", "k at target"):
        table.add_column(column, justify="left" if column in ("layer", "gating") else "right")
    for layer in usage:
        table.add_row(
            layer.name,
            layer.gating,
            str(layer.in_channels),
            f"{layer.kept_fraction * layer.in_channels:.1f}",
            f"{layer.kept_fraction * 100:.1f}%",
            str(layer.kept),
        )
    console.print(table)
