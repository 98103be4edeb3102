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

from dgc_convert.display import StepProgress, error_console, format_macs, output_console
from dgc_convert.nn.settings import DEFAULT_SQUEEZE_RULE
from dgc_convert.training.progress_bars import TrainProgress, stage_rows

if TYPE_CHECKING:  # only named here; importing them would import torch
    from dgc_convert.measuring.bench import BenchResult
    from dgc_convert.measuring.conversion_summary import ConversionSummary
    from dgc_convert.measuring.evaluate import EvalReport
    from dgc_convert.measuring.gate_usage import LayerChannelUsage

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
    for row in stage_rows(stages):
        table.add_row(*row)
    console.print(table)


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
