"""dgc-convert: Dynamic Group Convolution for any timm or torchvision CNN.

The public API is re-exported here; see README.md for a tour.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from typing import TYPE_CHECKING, Any

try:  # the version is written once, in pyproject.toml, and read from the installed metadata
    __version__ = _installed_version("dgc-convert")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

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
from dgc_convert.macs import LayerMacs, MacReport, count_macs
from dgc_convert.nn.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.nn.network_gate import update_threshold
from dgc_convert.surgery import (
    ConversionReport,
    LayerDecision,
    LayerOverride,
    LayerSettings,
    apply_conversion,
    check_identity,
    convert,
    dgc_layers,
    plan_conversion,
    set_zeta,
    sparsity_loss,
)
from dgc_convert.zoo import ModelInfo, create_model, list_models

# Training, serving and file formats load on first use: `dgc-convert MODEL`
# needs none of them, and the CLI's start-up time is what a user feels first.
_LAZY = {
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "ConvertSection": "recipe",
    "ModelSection": "recipe",
    "build_model": "build",
    "BuiltModel": "build",
    "Schedule": "schedule",
    "train": "trainer",
    "TrainResult": "trainer",
    "EpochMetrics": "trainer",
    "prepare_for_inference": "prepare",
    "InferenceReport": "prepare",
    "benchmark": "bench",
    "BenchResult": "bench",
    "save": "serialize",
    "load": "serialize",
    "TrainProgress": "cli.render",
    "StepProgress": "cli.render",
}


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from dgc_convert.bench import BenchResult, benchmark
    from dgc_convert.build import BuiltModel, build_model
    from dgc_convert.cli.render import StepProgress, TrainProgress
    from dgc_convert.prepare import InferenceReport, prepare_for_inference
    from dgc_convert.recipe import ConvertSection, ModelSection, Recipe, load_recipe
    from dgc_convert.schedule import Schedule
    from dgc_convert.serialize import load, save
    from dgc_convert.trainer import EpochMetrics, TrainResult, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dgc_convert' has no attribute {name!r}")
    import importlib

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
    "StepProgress",
    "__version__",
]
