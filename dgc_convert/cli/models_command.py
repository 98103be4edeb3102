"""``dgc-convert list-models PATTERN``: the model names timm and torchvision can build."""

from __future__ import annotations

import typer

from dgc_convert.cli.exits import fail, handles_errors
from dgc_convert.cli.options import JsonOption

__all__ = ["LIST_MODELS_HELP", "list_models_command"]

LIST_MODELS_HELP = "List model names from timm and torchvision matching PATTERN (glob or substring)."


@handles_errors
def list_models_command(
    pattern: str = typer.Argument("*", help="Glob such as 'resnet*', or a substring."),
    tags: bool = typer.Option(
        False, "--tags", help="Also list timm's pretrained tags (ARCH.TAG, e.g. resnet50.a1_in1k): names it builds too."
    ),
    json_output: JsonOption = False,
) -> None:
    """Print (or ``--json``) every (name, library) matching PATTERN; no match is bad input."""
    from dgc_convert.cli.render import print_json, print_model_list
    from dgc_convert.conversion.zoo import list_models

    models = list_models(pattern, tags=tags)
    if json_output:
        print_json([{"name": n, "library": lib} for n, lib in models])
    elif not models:
        fail(f"no model matches {pattern!r}")
    else:
        print_model_list(models)
