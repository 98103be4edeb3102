"""Where a model to benchmark comes from: a model name, or a checkpoint the trainer wrote."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from dgc_convert.checkpoint import CheckpointError, read_checkpoint
from dgc_convert.errors import DGCConvertError
from dgc_convert.recipe import recipe_from_dict
from dgc_convert.surgery import convert
from dgc_convert.zoo import create_model

__all__ = ["models_for_bench", "model_from_checkpoint"]


def _recipe_and_sizes(path: Path) -> tuple[dict, int | None, int | None, Path]:
    """(recipe data, num_classes, image_size, weights file) of a checkpoint directory or weights file."""
    if path.is_dir():
        checkpoint = read_checkpoint(path)
        state = checkpoint.state
        return state.get("recipe") or {}, state.get("num_classes"), state.get("image_size"), checkpoint.directory / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    if "recipe" not in metadata:
        raise CheckpointError(f"{path}: no recipe in its metadata; not written by dgc-convert's trainer")
    sizes = [int(metadata[k]) if metadata.get(k) else None for k in ("num_classes", "image_size")]
    return json.loads(metadata["recipe"]), sizes[0], sizes[1], path


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, nn.Module, dict[str, Any], int | None]:
    """(trained DGC model, untrained dense model of the same architecture, recipe data, image size) of a checkpoint."""
    from dgc_convert.train import build_model  # training builds models the one way recipes describe

    path = Path(path)
    data, classes, image_size, weights = _recipe_and_sizes(path)
    recipe = recipe_from_dict(data, str(path))
    model, _ = build_model(recipe, classes)
    read = read_checkpoint(weights.parent) if (weights.parent / "state.json").is_file() else None
    if read is not None:
        read.load_weights(model)
    else:
        from safetensors.torch import load_model

        try:
            load_model(model, str(weights), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{weights}: does not fit the model its recipe builds: {str(error).splitlines()[0]}") from None
    dense, _ = build_model(recipe.model_copy(update={"convert": recipe.convert.model_copy(update={"enabled": False})}), classes)
    return model, dense, data, image_size


def models_for_bench(target: str, settings: dict[str, Any]) -> tuple[nn.Module, nn.Module, str, int | tuple[int, ...]]:
    """(dense, DGC, display name, default input size) for ``dgc-convert bench TARGET``.

    ``target`` is a checkpoint (directory or ``model.safetensors``) or a model
    name; ``settings`` (heads, zeta, squeeze_ratio, min_channels, source) apply
    to model names only.
    """
    path = Path(target)
    if path.exists():
        conversion = {k: v for k, v in settings.items() if k != "source"}
        if conversion:
            raise DGCConvertError(f"{target}: --{next(iter(conversion)).replace('_', '-')} applies to model names; a checkpoint carries its own conversion")
        model, dense, data, image_size = model_from_checkpoint(path)
        return dense, model, f"{data.get('model', {}).get('name', path.name)} ({path})", image_size or 224
    source = settings.pop("source", "auto")
    dense = create_model(target, source=source)
    dgc = copy.deepcopy(dense)
    convert(dgc, **settings)
    return dense, dgc, target, dense.dgc_model_info.input_size
