"""``dgc-convert MODEL`` (``dgc-convert convert MODEL``): convert a model and report every
convolution's decision and the MACs saved. What it builds is imported when it runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dgc_convert.cli.exits import fail, handles_errors
from dgc_convert.cli.options import (
    CheckpointOption,
    GatingOption,
    HeadsOption,
    InputSizeOption,
    JsonOption,
    MinChannelsOption,
    NumClassesOption,
    PreactOption,
    SourceOption,
    SqueezeRatioOption,
    SqueezeRuleOption,
    ZetaOption,
)
from dgc_convert.display import StepProgress, output_console

if TYPE_CHECKING:
    from dgc_convert.conversion.settings import ConvertSection, ModelSection
    from dgc_convert.training.recipe import Recipe

__all__ = ["CONVERT_HELP", "convert_command"]

CONVERT_HELP = "Convert MODEL and report, for every convolution, what happened and the MACs saved."


def _as_trained(recipe: Recipe) -> ModelSection:
    """The recipe's model section as ``train`` builds it: the data set's class count
    and the image size the run trains at, where the section leaves them unset."""
    from dgc_convert.training.data import DataError, dataset_classes
    from dgc_convert.training.setup import recipe_image_size

    spec = recipe.model
    update: dict[str, Any] = {}
    # An image folder that is not there keeps the model's own head.
    if spec.num_classes is None:
        with contextlib.suppress(DataError):
            update["num_classes"] = dataset_classes(recipe.data)
    # train's order: data.image_size first, then model.input_size, then the data set's native size.
    if recipe_image_size(recipe) is not None:
        update["input_size"] = recipe_image_size(recipe)
    return spec.model_copy(update=update)


@handles_errors
def convert_command(
    model: Annotated[
        str | None, typer.Argument(help="Model name (timm or torchvision; timm:NAME / torchvision:NAME to choose).")
    ] = None,
    heads: HeadsOption = None,
    zeta: ZetaOption = None,
    squeeze_ratio: SqueezeRatioOption = None,
    gating: GatingOption = None,
    preact: PreactOption = None,
    squeeze_rule: SqueezeRuleOption = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Glob over module names; only matching convs convert. Repeatable."),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob over module names to leave dense. Repeatable.")
    ] = None,
    min_channels: MinChannelsOption = None,
    input_size: InputSizeOption = None,
    num_classes: NumClassesOption = None,
    source: SourceOption = None,
    checkpoint: CheckpointOption = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Take model and convert settings from a recipe; options given here win."),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Verify the converted model equals the original at zeta 0 with unit scores.")
    ] = False,
    save_path: Annotated[
        Path | None,
        typer.Option(
            "--save", help="Write the converted (untrained) model to FILE.safetensors; dgc_convert.load opens it."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Convert MODEL (or a recipe's model) with the given settings and print, or ``--json``, the
    conversion summary; ``--save`` writes the converted model, ``--check`` verifies identity at zeta 0."""
    from dgc_convert.cli.render import print_conversion, print_json
    from dgc_convert.conversion.settings import convert_settings, model_settings
    from dgc_convert.measuring.conversion_summary import summarize_conversion
    from dgc_convert.training.recipe import load_recipe

    base_convert: ConvertSection | None = None
    base_model: ModelSection | None = None
    if recipe is not None:
        loaded = load_recipe(recipe)
        if not loaded.convert.enabled:
            fail(f"{recipe}: convert.enabled is false; nothing to convert")
        base_convert, base_model = loaded.convert, _as_trained(loaded)
    elif model is None:
        fail("give a MODEL name or --recipe FILE (see `dgc-convert --help`)")
    # The recipe's values, then the options given here: one validation, the schema's.
    model_spec = model_settings(
        base_model,
        name=model,
        source=source,
        input_size=input_size,
        num_classes=num_classes,
        checkpoint=str(checkpoint) if checkpoint else None,
    )
    settings = convert_settings(
        base_convert,
        heads=heads,
        zeta=zeta,
        squeeze_ratio=squeeze_ratio,
        gating=gating,
        preact=preact,
        squeeze_rule=squeeze_rule,
        include=include or None,
        exclude=exclude or None,
        min_channels=min_channels,
    )
    with StepProgress() as progress:
        summary = summarize_conversion(model_spec, settings, check=check, progress=progress)
        saved = None
        if save_path is not None:
            assert summary.converted_model is not None  # summarize_conversion always returns it
            from dgc_convert.conversion.saved_models import save

            progress.step(f"saving to {save_path}")
            saved = save(summary.converted_model, save_path, input_size=summary.input_size)
    if json_output:
        weights = {"checkpoint": model_spec.checkpoint} if model_spec.checkpoint else {}
        print_json({**summary.to_dict(), **weights, **({"saved": str(saved)} if saved else {})})
    else:
        print_conversion(summary)
        if model_spec.checkpoint:
            output_console().print(
                f"started from the weights in {model_spec.checkpoint}", highlight=False, markup=False
            )
        if saved:
            output_console().print(f"saved to {saved} (load it with dgc_convert.load)", highlight=False, markup=False)
