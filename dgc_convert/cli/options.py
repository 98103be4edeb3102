"""Options and arguments that several commands share, declared once as ``Annotated`` aliases.

A command names ``heads: HeadsOption = None`` instead of repeating the option's flag and help.
Help texts read their defaults and choices from the schema (``conversion.settings``) and the
file-name facts (``files.names``), never from a module that imports torch: Typer builds every
``--help`` from these declarations, and ``--help`` must stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer
from pydantic import BaseModel

from dgc_convert.conversion.settings import ConvertSection, ModelSection
from dgc_convert.files.names import WEIGHTS_SUFFIXES

__all__ = [
    "schema_default",
    "HeadsOption",
    "ZetaOption",
    "SqueezeRatioOption",
    "GatingOption",
    "PreactOption",
    "SqueezeRuleOption",
    "MinChannelsOption",
    "SourceOption",
    "InputSizeOption",
    "NumClassesOption",
    "CheckpointOption",
    "SetOption",
    "JsonOption",
    "BatchSizeOption",
    "RecipeFileArgument",
    "SavedModelArgument",
    "DataOption",
    "RootOption",
]


def schema_default(section: type[BaseModel], key: str) -> str:
    """A setting's default as the schema holds it, written for a person: on/off, ``the model's`` for
    unset, floats without trailing zeros. Help texts and ``recipe validate`` name defaults this way."""
    value = section.model_fields[key].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return "the model's" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _sources() -> str:
    """``auto, timm or torchvision``: the schema's choices of model.source."""
    *first, last = get_args(ModelSection.model_fields["source"].annotation)
    return f"{', '.join(first)} or {last}"


HeadsOption = Annotated[
    int | None,
    typer.Option("--heads", help=f"Heads per converted layer (default {schema_default(ConvertSection, 'heads')})."),
]
ZetaOption = Annotated[
    float | None,
    typer.Option(
        "--zeta",
        help=f"Pruning ratio: fraction of input channels each head drops, in [0, 1) (default {schema_default(ConvertSection, 'zeta')}).",
    ),
]
SqueezeRatioOption = Annotated[
    float | None,
    typer.Option(
        "--squeeze-ratio",
        help=f"Saliency generator squeeze ratio d (default {schema_default(ConvertSection, 'squeeze_ratio')}).",
    ),
]
GatingOption = Annotated[
    str | None,
    typer.Option(
        "--gating",
        help="head: each head keeps its top k channels; network: DGC-G, every channel scoring above one "
        "model-wide threshold, so k varies per sample and MAC figures are expected ones "
        f"(default {schema_default(ConvertSection, 'gating')}).",
    ),
]
PreactOption = Annotated[
    bool | None,
    typer.Option(
        "--preact/--no-preact",
        help="Give each DGC layer its own BatchNorm + ReLU in front of its gates and convolution, as the "
        f"authors' networks have (default {schema_default(ConvertSection, 'preact')}).",
    ),
]
SqueezeRuleOption = Annotated[
    str | None,
    typer.Option(
        "--squeeze-rule",
        help="Saliency generator width and init: standard (max(C//d, 4), uniform) or authors (their code's: "
        f"d halved below 80 channels, kaiming normal) (default {schema_default(ConvertSection, 'squeeze_rule')}).",
    ),
]
MinChannelsOption = Annotated[
    int | None,
    typer.Option(
        "--min-channels",
        help=f"Fewest input channels worth gating (default {schema_default(ConvertSection, 'min_channels')}).",
    ),
]
SourceOption = Annotated[
    str | None,
    typer.Option("--source", help=f"{_sources()} (default {schema_default(ModelSection, 'source')})."),
]
InputSizeOption = Annotated[
    int | None, typer.Option("--input-size", help="Square input side in pixels (default: the model's).")
]
NumClassesOption = Annotated[
    int | None,
    typer.Option(
        "--num-classes", help="Classifier width, e.g. to match a checkpoint's classes (default: the model's)."
    ),
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help=f"Start from trained dense weights: a {', '.join(WEIGHTS_SUFFIXES)} file, or a training run's "
        "last/ or best/ directory holding a dense model (read strictly; pickles only as weights-only). "
        "Wins over the recipe's model.checkpoint.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe value: KEY.PATH=VALUE (YAML value), e.g. train.epochs=3. Repeatable."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout and nothing else.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward.")]
RecipeFileArgument = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
SavedModelArgument = Annotated[
    Path, typer.Argument(help="A saved model (.safetensors) or a training run's last/ or best/ directory.")
]
DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="A recipe file (its data section) or a data set: digits, synthetic, cifar10, cifar100, imagefolder.",
    ),
]
RootOption = Annotated[Path | None, typer.Option("--root", help="Data directory for cifar10/cifar100/imagefolder.")]
