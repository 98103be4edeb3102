"""dgc-convert: Dynamic Group Convolution for any timm or torchvision CNN.

The public API is re-exported here, lazily (PEP 562): ``import dgc_convert`` loads nothing but
this file, and each name imports its module on first use, so a caller (the CLI's ``--help``
first) pays only for what it uses. See README.md for a tour.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dgc_convert._version import __version__

# Public name -> the module (under dgc_convert) that defines it.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        [
            "CheckpointError",
            "ConversionError",
            "DataError",
            "DGCConvertError",
            "ExportError",
            "IdentityCheckError",
            "LoadError",
            "RecipeError",
            "SettingsError",
            "TrainingDiverged",
            "UnknownModelError",
        ],
        "errors",
    ),
    **dict.fromkeys(["LayerMacs", "MacReport", "count_macs"], "measuring.macs"),
    **dict.fromkeys(["DGCConv2d", "Gates", "SaliencyGenerator", "kept_channel_count"], "nn.layer"),
    **dict.fromkeys(["dgc_mode"], "nn.modes"),
    **dict.fromkeys(["LayerSettings"], "nn.settings"),
    **dict.fromkeys(["update_threshold"], "nn.network_gate"),
    **dict.fromkeys(
        [
            "ConversionReport",
            "LayerDecision",
            "LayerOverride",
            "SkipReason",
            "apply_conversion",
            "check_identity",
            "convert",
            "dgc_layers",
            "plan_conversion",
            "set_zeta",
            "sparsity_loss",
        ],
        "conversion.surgery",
    ),
    **dict.fromkeys(["ModelInfo", "create_model", "list_models"], "conversion.zoo"),
    **dict.fromkeys(["ConvertSection", "ModelSection"], "conversion.settings"),
    **dict.fromkeys(["BuiltModel", "build_model"], "conversion.build"),
    **dict.fromkeys(["load", "save"], "conversion.saved_models"),
    **dict.fromkeys(["BenchResult", "benchmark"], "measuring.bench"),
    **dict.fromkeys(["InferenceReport", "prepare_for_inference"], "serving.prepare"),
    **dict.fromkeys(["Recipe", "load_recipe"], "training.recipe"),
    **dict.fromkeys(["Schedule"], "training.schedule"),
    **dict.fromkeys(["EpochMetrics", "TrainResult", "train"], "training.trainer"),
    **dict.fromkeys(["TrainCallback"], "training.events"),
    **dict.fromkeys(["TrainProgress"], "training.progress_bars"),
    **dict.fromkeys(["StepProgress"], "display"),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from dgc_convert.conversion.build import BuiltModel, build_model
    from dgc_convert.conversion.saved_models import load, save
    from dgc_convert.conversion.settings import ConvertSection, ModelSection
    from dgc_convert.conversion.surgery import (
        ConversionReport,
        LayerDecision,
        LayerOverride,
        SkipReason,
        apply_conversion,
        check_identity,
        convert,
        dgc_layers,
        plan_conversion,
        set_zeta,
        sparsity_loss,
    )
    from dgc_convert.conversion.zoo import ModelInfo, create_model, list_models
    from dgc_convert.display import StepProgress
    from dgc_convert.errors import (
        CheckpointError,
        ConversionError,
        DataError,
        DGCConvertError,
        ExportError,
        IdentityCheckError,
        LoadError,
        RecipeError,
        SettingsError,
        TrainingDiverged,
        UnknownModelError,
    )
    from dgc_convert.measuring.bench import BenchResult, benchmark
    from dgc_convert.measuring.macs import LayerMacs, MacReport, count_macs
    from dgc_convert.nn.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count
    from dgc_convert.nn.modes import dgc_mode
    from dgc_convert.nn.network_gate import update_threshold
    from dgc_convert.nn.settings import LayerSettings
    from dgc_convert.serving.prepare import InferenceReport, prepare_for_inference
    from dgc_convert.training.events import TrainCallback
    from dgc_convert.training.progress_bars import TrainProgress
    from dgc_convert.training.recipe import Recipe, load_recipe
    from dgc_convert.training.schedule import Schedule
    from dgc_convert.training.trainer import EpochMetrics, TrainResult, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dgc_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dgc_convert.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DGCConv2d",
    "dgc_mode",
    "Gates",
    "SaliencyGenerator",
    "kept_channel_count",
    "update_threshold",
    "convert",
    "plan_conversion",
    "apply_conversion",
    "LayerSettings",
    "ConversionReport",
    "LayerDecision",
    "LayerOverride",
    "SkipReason",
    "check_identity",
    "dgc_layers",
    "set_zeta",
    "sparsity_loss",
    "count_macs",
    "MacReport",
    "LayerMacs",
    "create_model",
    "list_models",
    "ModelInfo",
    "DGCConvertError",
    "SettingsError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "ConversionError",
    "IdentityCheckError",
    "RecipeError",
    "UnknownModelError",
    "Recipe",
    "ConvertSection",
    "ModelSection",
    "build_model",
    "BuiltModel",
    "load_recipe",
    "Schedule",
    "train",
    "TrainResult",
    "EpochMetrics",
    "TrainingDiverged",
    "prepare_for_inference",
    "InferenceReport",
    "benchmark",
    "BenchResult",
    "save",
    "load",
    "LoadError",
    "TrainProgress",
    "TrainCallback",
    "StepProgress",
    "__version__",
]
