"""``dgc-convert recipe validate|show FILE``: check a recipe file, and show it resolved.

``validate`` reads the schema (pydantic, no torch) and asks the model libraries whether they
build the recipe's model; ``show`` also counts the training set to print iteration ranges.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dgc_convert.cli.exits import fail, handles_errors
from dgc_convert.cli.options import JsonOption, RecipeFileArgument, SetOption, schema_default
from dgc_convert.conversion.settings import ConvertSection, ModelSection

__all__ = ["recipe_app", "recipe_validate_command", "recipe_show_command"]

recipe_app = typer.Typer(no_args_is_help=True, help="Check recipe files and show them resolved.")


def _resolve_recipe_model(file: Path, spec: ModelSection) -> tuple[str, str]:
    """(bare name, library) the recipe's model.name and model.source resolve to, without building the
    model; an unknown name is one line naming the file, with close matches."""
    from dgc_convert.conversion.zoo import resolve
    from dgc_convert.errors import UnknownModelError

    try:
        bare, library, _ = resolve(spec.name, spec.source)
    except UnknownModelError as error:
        raise UnknownModelError(f"{file}: model.name: {error}") from None
    return bare, library


@recipe_app.command("validate", help="Check FILE against the recipe schema; one line saying what is wrong, or OK.")
@handles_errors
def recipe_validate_command(file: RecipeFileArgument, set_values: SetOption = None) -> None:
    """Print ``FILE: OK (...)`` with what the recipe trains, or fail with one line saying what is wrong."""
    from dgc_convert.training.recipe import load_recipe

    recipe = load_recipe(file, set_values)
    name, library = _resolve_recipe_model(file, recipe.model)
    weights = ", pretrained" if recipe.model.pretrained else ""
    if recipe.model.checkpoint is not None:
        from dgc_convert.conversion.dense_weights import find_weights_file  # imports torch: only when asked
        from dgc_convert.errors import WeightsFileError

        try:  # exists and is a weights file; read only when a run starts
            find_weights_file(recipe.model.checkpoint)
        except WeightsFileError as error:
            raise WeightsFileError(f"{file}: model.checkpoint: {error}") from None
        weights = f", starting from {recipe.model.checkpoint}"
    c = recipe.convert
    state = (
        "dense baseline"
        if not c.enabled
        else f"DGC heads {c.heads}, zeta {c.zeta:g}"
        + (f", {c.gating} gating" if c.gating != schema_default(ConvertSection, "gating") else "")
        + (", pre-activation" if c.preact else "")
        + (
            f", squeeze rule {c.squeeze_rule}"
            if c.squeeze_rule != schema_default(ConvertSection, "squeeze_rule")
            else ""
        )
    )
    typer.echo(
        f"{file}: OK ({name} from {library}{weights}, {state}, {recipe.train.epochs} epochs on {recipe.data.dataset})"
    )


@recipe_app.command(
    "show", help="Print FILE resolved (every default filled in) and its three stages as epoch and iteration ranges."
)
@handles_errors
def recipe_show_command(
    file: RecipeFileArgument, set_values: SetOption = None, json_output: JsonOption = False
) -> None:
    """Print the recipe with every default filled in and its stages (``--json``: the same as one object);
    without the data set on disk, iteration ranges are unknown and say why."""
    from dataclasses import asdict

    from dgc_convert.cli.render import print_json, print_recipe
    from dgc_convert.training.data import DataError, train_set_size
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.schedule import Schedule
    from dgc_convert.training.trainer import iterations_per_epoch

    recipe = load_recipe(file, set_values)
    _, library = _resolve_recipe_model(file, recipe.model)  # a name no library builds is an error here too
    t = recipe.train
    try:
        samples: int | None = train_set_size(recipe.data)
    except DataError as error:
        samples, missing = None, str(error)
    # Without the data, stages are still exact in epochs when measured on a fine grid.
    per_epoch = iterations_per_epoch(samples, t.batch_size) if samples is not None else 10_000
    if per_epoch < 1:
        fail(f"{file}: train.batch_size={t.batch_size} is larger than the {samples} training samples")
    schedule = Schedule.from_train(t, per_epoch)
    stages = [asdict(s) for s in schedule.stages()]
    shown_per_epoch: int | None = per_epoch
    if samples is None:
        for stage in stages:
            stage["start_iteration"] = stage["end_iteration"] = None
        shown_per_epoch = None
    data = recipe.model_dump(mode="json")
    if json_output:
        print_json(
            {
                "recipe": data,
                "library": library,
                "train_samples": samples,
                "iterations_per_epoch": shown_per_epoch,
                "stages": stages,
            }
        )
    else:
        print_recipe(data, stages, shown_per_epoch, samples, note=None if samples is not None else missing)
