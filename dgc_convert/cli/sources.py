"""Where a model to benchmark comes from: a model name, or a saved model / trainer checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dgc_convert.conversion.build import build_model, create_dense
from dgc_convert.conversion.saved_models import load
from dgc_convert.conversion.settings import convert_settings, model_settings
from dgc_convert.conversion.zoo import require_model_info
from dgc_convert.errors import DGCConvertError
from dgc_convert.files.checkpoint_dirs import find_checkpoint

__all__ = ["models_for_bench"]


def models_for_bench(
    target: str,
    conversion: dict[str, Any],
    *,
    source: str | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, nn.Module, str, tuple[int, int, int]]:
    """(dense, DGC, display name, default input size) for ``dgc-convert bench TARGET``.

    ``target`` is a saved model (``.safetensors``, or a trainer checkpoint
    directory) or a model name; ``conversion`` (the given options among heads,
    zeta, squeeze_ratio, gating, preact, squeeze_rule, min_channels), ``source``
    and ``num_classes`` apply to model names
    only, and ``input_size`` (square side in pixels, the model's own when None)
    is where a model name's conversion weighs each layer's MACs. The dense counterpart of a saved model is the same architecture,
    untrained: only speed is measured.
    """
    path = Path(target)
    # Model names hold no path separator; a run's last/ cut between its two renames
    # exists only as the copy set aside, which load finds (find_checkpoint).
    if path.exists() or path.suffix == ".safetensors" or "/" in target or find_checkpoint(path) is not None:
        named_only = {**conversion, "source": source, "num_classes": num_classes}
        given = [key for key, value in named_only.items() if value is not None]
        if given:
            flag = given[0].replace("_", "-")
            raise DGCConvertError(
                f"{target}: --{flag} applies to model names; a saved model carries its own conversion and classes"
            )
        model = load(path)
        info = require_model_info(model)
        dense = create_dense(model_settings(name=info.name, source=info.library, num_classes=info.num_classes))
        return dense, model, f"{info.name} ({path})", info.input_size
    built = build_model(
        model_settings(name=target, source=source, num_classes=num_classes),
        convert_settings(**conversion),
        keep_dense=True,
        input_size=input_size,
    )
    assert built.dense is not None  # keep_dense
    return built.dense, built.model, target, require_model_info(built.model).input_size
