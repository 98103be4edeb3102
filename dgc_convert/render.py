"""The one place that turns results into what a person reads: rich tables or JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from dgc_convert.summary import ConversionSummary

__all__ = ["format_macs", "print_json", "print_conversion", "print_model_list", "error_console"]


def format_macs(macs: float) -> str:
    """A MAC count with a unit: 1.82 G, 549.3 M, 12.0 K."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout and nothing else."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
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
        f"min channels {s['min_channels']}"
        + (f", include {s['include']}" if s["include"] else "")
        + (f", exclude {s['exclude']}" if s["exclude"] else "")
        + (f", overrides {list(s['overrides'])}" if s["overrides"] else "")
    )
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("layer", overflow="fold")
    table.add_column("conv", no_wrap=True)
    table.add_column("decision")
    table.add_column("dense MACs", justify="right", no_wrap=True)
    table.add_column("DGC MACs", justify="right", no_wrap=True)
    for row in summary.layers:
        if row.status == "converted":
            decision = f"[green]DGC[/green] H{row.heads} z{row.zeta:g} k{row.kept}"
        else:
            decision = f"[yellow]kept dense[/yellow]: {row.reason}"
        table.add_row(row.name, row.geometry, decision, format_macs(row.dense_macs), format_macs(row.dgc_macs))
    console.print(table)
    t = summary.totals
    console.print(
        f"converted {t['converted_layers']} of {t['convolutions']} convolutions; "
        f"MACs per sample: dense {format_macs(t['dense_macs'])}, DGC {format_macs(t['dgc_macs'])} "
        f"([bold]{t['saving'] * 100:.1f}% saved[/bold]); "
        f"parameters: dense {_count(t['dense_params'])}, DGC {_count(t['dgc_params'])}"
    )
    if summary.identity_max_diff is not None:
        console.print(
            f"identity check passed: max difference {summary.identity_max_diff:.2e} at zeta 0 with unit scores"
        )


def print_model_list(models: list[tuple[str, str]], console: Console | None = None) -> None:
    """One model a line: name and library."""
    console = console or output_console()
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("model")
    table.add_column("library")
    for name, library in models:
        table.add_row(name, library)
    console.print(table)
    console.print(f"{len(models)} models")
