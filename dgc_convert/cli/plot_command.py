"""``dgc-convert plot RUN_DIR...``: draw training runs' curves on the same axes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dgc_convert.cli.exits import fail, handles_errors, require_png
from dgc_convert.display import output_console
from dgc_convert.files.names import CURVES_FILE, METRICS_FILE

__all__ = ["PLOT_HELP", "plot_command"]

PLOT_HELP = (
    "Draw the curves of one or more training runs on the same axes: top-1, loss, zeta_t and MACs per sample "
    "against epoch (e.g. a DGC run against its dense baseline)."
)


@handles_errors
def plot_command(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR", help="Training runs' output directories (each holds metrics.jsonl)."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="The PNG to write (default: curves.png in the current directory).")
    ] = Path("curves.png"),
) -> None:
    """Write the runs' curves to ``--out`` and print one summary line per run; a run's own
    curves.png may be redrawn only from that run alone (the trainer owns it)."""
    from dgc_convert.files.plots import read_runs, write_curves

    require_png(out, "--out")
    curves = read_runs(runs)
    # A run's own curves.png is its trainer's: only the same single run may be redrawn into it.
    target = out.resolve()
    if (
        target.name == CURVES_FILE
        and (target.parent / METRICS_FILE).is_file()
        and [r.resolve() for r in runs] != [target.parent]
    ):
        fail(f"{out} is the curves picture of the run in {target.parent}; choose another --out")
    written = write_curves(curves, out, title=None if len(curves) == 1 else "training curves")
    console = output_console()
    console.print(f"wrote {written}", highlight=False, markup=False)
    for run in curves:
        console.print(f"  {run.summary}", highlight=False, markup=False)
