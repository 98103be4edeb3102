"""Where a model to benchmark comes from: a model name, or a saved model / trainer checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from dgc_convert.errors import DGCConvertError
from dgc_convert.serialize import load
from dgc_convert.surgery import convert
from dgc_convert.zoo import create_model

__all__ = ["models_for_bench"]


def models_for_bench(target: str, settings: dict[str, Any]) -> tuple[nn.Module, nn.Module, str, int | tuple[int, ...]]:
    """(dense, DGC, display name, default input size) for ``dgc-convert bench TARGET``.

    ``target`` is a saved model (``.safetensors``, or a trainer checkpoint
    directory) or a model name; ``settings`` (heads, zeta, squeeze_ratio,
    min_channels, source) apply to model names only. The dense counterpart of
    a saved model is the same architecture, untrained: only speed is measured.
    """
    path = Path(target)
    if path.exists():
        conversion = {k: v for k, v in settings.items() if k != "source"}
        if conversion:
            flag = next(iter(conversion)).replace("_", "-")
            raise DGCConvertError(f"{target}: --{flag} applies to model names; a saved model carries its own conversion")
        model = load(path)
        info = model.dgc_model_info
        dense = create_model(info.name, source=info.library, num_classes=info.num_classes)
        return dense, model, f"{info.name} ({path})", info.input_size
    source = settings.pop("source", "auto")
    dense = create_model(target, source=source)
    dgc = copy.deepcopy(dense)
    convert(dgc, **settings)
    return dense, dgc, target, dense.dgc_model_info.input_size
