"""``dgc-convert export FILE --onnx OUT``: a saved model as ONNX with its dynamic gating, checked with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from dgc_convert.cli.exits import EXIT_RUN_FAILED, fail, handles_errors, os_error_exit
from dgc_convert.cli.options import SavedModelArgument
from dgc_convert.display import StepProgress, output_console

__all__ = ["EXPORT_HELP", "export_command"]

EXPORT_HELP = (
    "Export a saved model to ONNX with its dynamic gating (TopK, ScatterElements) and check it with onnxruntime."
)


@handles_errors
def export_command(
    file: SavedModelArgument,
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the .onnx file."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (the installed exporter's supported range)."),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", help="Largest max |onnxruntime - torch|, relative to the output scale."
    ),
    dynamic_size: bool = typer.Option(
        False,
        "--dynamic-size",
        help="Make height and width dynamic too (batch always is); the check then also runs at "
        "1.5x the saved input size, rounded up to a multiple of 32.",
    ),
) -> None:
    """Export, check against PyTorch, and print the graph's signature and the differences; the file
    is put in place only when the check passes (otherwise exit 1, any old file kept)."""
    from dgc_convert.conversion.saved_models import load
    from dgc_convert.serving.export import ExportReport, check_export_options, export_onnx

    check_export_options(opset, tolerance)  # before loading anything: one line, exit 2
    with StepProgress() as progress:
        progress.step(f"loading {file}")
        model = load(file)  # its own errors name FILE, not the ONNX file
        try:
            report: ExportReport | None = export_onnx(
                model, onnx, opset=opset, tolerance=tolerance, dynamic_size=dynamic_size, progress=progress
            )
        except OSError as error:  # writing the file, e.g. a full disk: nothing was renamed into place
            report, failure = None, error
    if report is None:  # after the progress line is gone
        kept = "the existing file is kept" if onnx.exists() else "nothing was written"
        fail(f"{onnx}: not written ({kept}): {failure.strerror or failure}", os_error_exit(failure))
    ops = ", ".join(f"{count} {op}" for op, count in sorted(report.gating_ops.items()))
    diffs = "; ".join(report.diffs_by_size())
    console = output_console()
    # The file is in place only when the parity check passed (report.written).
    what = f"wrote {report.path}" if report.written else f"exported (not written to {report.path})"
    console.print(
        f"{what} (opset {report.opset}; gating kept: {ops or 'no DGC layers'})", highlight=False, markup=False
    )
    # The graph's signature: named dims are dynamic, ints fixed.
    inputs, outputs = (", ".join(map(str, shape)) for shape in (report.input_shape, report.output_shape))
    console.print(
        f"input {report.input_name!r} ({inputs}) -> output {report.output_name!r} ({outputs})", highlight=False
    )
    console.print(
        f"onnxruntime vs PyTorch max |difference| (tolerance {report.tolerance:.1e}), by height x width:",
        highlight=False,
    )
    for line in report.diffs_by_size():
        console.print(f"  {line}", highlight=False)
    if not report.passed:
        kept = "the existing file is kept" if report.path.exists() else "nothing was written"
        fail(
            f"{report.path}: not written ({kept}): onnxruntime output differs from PyTorch beyond tolerance ({diffs})",
            EXIT_RUN_FAILED,
        )
