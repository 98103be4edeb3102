"""``dgc-convert eval`` and ``dgc-convert inspect``: a saved model on a data set's held-out split,
measured for accuracy and MACs (eval) or for which channels its heads keep (inspect)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dgc_convert.cli.exits import fail, handles_errors
from dgc_convert.cli.options import BatchSizeOption, DataOption, JsonOption, RootOption, SavedModelArgument
from dgc_convert.display import StepProgress, error_console, output_console

if TYPE_CHECKING:
    from torch import nn

    from dgc_convert.progress import Progress
    from dgc_convert.training.data import DataBundle
    from dgc_convert.training.recipe import DataSection

__all__ = ["EVAL_HELP", "INSPECT_HELP", "eval_command", "inspect_command"]

EVAL_HELP = "Evaluate a saved model on a data set: top-1/top-5 and the MACs per sample it really spent."
INSPECT_HELP = "How often each head keeps each input channel over a data set: PNG heat maps and a JSON summary."


def _model_and_held_out(
    file: Path, data: str, root: Path | None, progress: Progress
) -> tuple[nn.Module, DataSection, DataBundle]:
    """The saved model at FILE and the held-out split of --data (a recipe file or a data set name)."""
    from pydantic import ValidationError

    from dgc_convert.conversion.saved_models import load
    from dgc_convert.conversion.zoo import require_model_info
    from dgc_convert.training.data import build_data
    from dgc_convert.training.recipe import DataSection, load_recipe

    progress.step(f"loading {file}")
    model = load(file)
    info = require_model_info(model)
    if Path(data).suffix in (".yaml", ".yml") or Path(data).is_file():
        section = load_recipe(data).data
    else:
        try:
            section = DataSection.model_validate({"dataset": data, "root": str(root) if root else None})
        except ValidationError as error:  # an unknown data set, or a missing root
            fail(f"--data {data!r}: {error.errors()[0]['msg'].removeprefix('Value error, ')}")
    progress.step(f"loading the {section.dataset} data")
    bundle = build_data(
        section.model_copy(update={"augmentation": "none"}),
        image_size=info.input_size[-1],
        num_classes=info.num_classes,
        seed=0,
        model=model,
    )
    return model, section, bundle


@handles_errors
def eval_command(
    file: SavedModelArgument,
    data: DataOption,
    root: RootOption = None,
    batch_size: BatchSizeOption = 64,
    json_output: JsonOption = False,
) -> None:
    """Print (or ``--json``) the model's accuracy and its static and realised MACs per sample;
    non-finite outputs are a warning on stderr."""
    from dgc_convert.cli.render import print_evaluation, print_json
    from dgc_convert.conversion.surgery import dgc_layers
    from dgc_convert.conversion.zoo import require_model_info
    from dgc_convert.measuring.evaluate import evaluate

    with StepProgress() as progress:
        model, section, bundle = _model_and_held_out(file, data, root, progress)
        info = require_model_info(model)
        report = evaluate(model, bundle.val, batch_size=batch_size, input_size=info.input_size, progress=progress)
    # DGC-G: the static figure is the cost expected at the target, not a fixed one.
    expected = any(layer.gating == "network" for _, layer in dgc_layers(model))
    if report.nonfinite_samples:  # on stderr in both modes: --json keeps stdout to the JSON
        error_console().print(
            f"[yellow]warning:[/yellow] {report.nonfinite_samples} of {report.samples} samples gave non-finite "
            f"outputs (NaN/inf logits); accuracy counts them as wrong and the loss is {report.loss:.4g}",
            markup=True,
            highlight=False,
        )
    if json_output:
        print_json({"model": str(file), "data": section.dataset, **report.to_dict(), "static_macs_expected": expected})
    else:
        print_evaluation(report, str(file), section.dataset, expected=expected)


@handles_errors
def inspect_command(
    file: SavedModelArgument,
    data: DataOption,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for the heat maps (one PNG per layer) and summary.json.")
    ],
    root: RootOption = None,
    batch_size: BatchSizeOption = 64,
) -> None:
    """Write one heat map per DGC layer (heads x input channels, keep frequency) and summary.json
    into ``--out``, print the per-layer table, and name the heads that collapsed."""
    from dgc_convert.cli.render import print_channel_usage
    from dgc_convert.measuring.gate_usage import channel_usage, write_heatmaps, write_summary

    with StepProgress() as progress:
        model, section, bundle = _model_and_held_out(file, data, root, progress)
        usage = channel_usage(model, bundle.val, batch_size=batch_size, progress=progress)
        progress.step(f"drawing {len(usage)} heat maps into {out}")
        images = write_heatmaps(usage, out)
        summary = write_summary(usage, out / "summary.json", model=str(file), data=section.dataset)
    console = output_console()
    print_channel_usage(usage, console)
    console.print(
        f"{len(images)} heat maps in {out}/ (heads x input channels, keep frequency over "
        f"{usage[0].samples if usage else 0} samples); summary: {summary}",
        highlight=False,
        markup=False,
    )
    for layer in usage:
        for head, reason in layer.collapsed:
            console.print(f"[yellow]collapsed[/yellow]: {layer.name} head {head}: {reason}", highlight=False)
