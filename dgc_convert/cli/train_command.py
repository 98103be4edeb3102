"""``dgc-convert train RECIPE``: train a recipe with the three-stage schedule (also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dgc_convert.cli.exits import EXIT_INTERRUPTED, fail, handles_errors
from dgc_convert.cli.options import CheckpointOption, SetOption
from dgc_convert.display import error_console
from dgc_convert.files.names import LAST_CHECKPOINT

__all__ = ["TRAIN_HELP", "train_command"]

TRAIN_HELP = "Train RECIPE from scratch with the three-stage schedule (also under torchrun)."


@handles_errors
def train_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).")],
    set_values: SetOption = None,
    checkpoint: CheckpointOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from output.directory/last exactly where it stopped.")
    ] = False,
) -> None:
    """Train the recipe; an interrupted run exits 130 and prints the command line that continues it."""
    from dgc_convert.conversion.settings import model_settings
    from dgc_convert.training.progress_bars import TrainProgress
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.trainer import is_main_process, train

    loaded = load_recipe(recipe, set_values)
    if checkpoint is not None:  # as --set model.checkpoint=PATH: part of the recipe a resume must repeat
        loaded = loaded.model_copy(update={"model": model_settings(loaded.model, checkpoint=str(checkpoint))})
    reporter = TrainProgress() if is_main_process() else None
    try:
        result = train(loaded, resume=resume, reporter=reporter)
    except KeyboardInterrupt:
        fail("aborted before a checkpoint could be written; the last one written (if any) is kept", EXIT_INTERRUPTED)
    finally:  # a run that raised never reached on_finish: its bars go before the error line
        if reporter is not None:
            reporter.close()
    if result.status == "interrupted":
        given = [*[f"--set {v}" for v in set_values or []], *([f"--checkpoint {checkpoint}"] if checkpoint else [])]
        again = " ".join(["dgc-convert train", str(recipe), *given, "--resume"])
        if is_main_process():
            error_console().print(
                f"stopped at epoch {result.epochs_completed + 1}, iteration {result.iteration} of "
                f"{result.total_iterations}; checkpoint written to {result.output_dir / LAST_CHECKPOINT}. Continue with: {again}",
                highlight=False,
                markup=False,
            )
        raise typer.Exit(EXIT_INTERRUPTED)
