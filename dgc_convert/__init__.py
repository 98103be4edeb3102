"""dgc-convert: Dynamic Group Convolution for any timm or torchvision CNN.

The public API is re-exported here; see README.md for a tour.
"""

__version__ = "0.1.0"  # before the imports below: checkpoint.py records it

from dgc_convert.errors import ConversionError, DGCConvertError, IdentityCheckError, RecipeError, UnknownModelError
from dgc_convert.nn.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count
from dgc_convert.macs import LayerMacs, MacReport, count_macs
from dgc_convert.surgery import (
    ConversionReport,
    LayerDecision,
    LayerOverride,
    check_identity,
    convert,
    dgc_layers,
    set_zeta,
    sparsity_loss,
)
from dgc_convert.zoo import ModelInfo, create_model, list_models

# Training, serving and file formats load on first use: `dgc-convert MODEL`
# needs none of them, and the CLI's start-up time is what a user feels first.
_LAZY = {
    "Recipe": "recipe", "load_recipe": "recipe",
    "Schedule": "schedule",
    "train": "trainer", "TrainResult": "trainer", "EpochMetrics": "trainer", "TrainingDiverged": "trainer",
    "prepare_for_inference": "prepare", "InferenceReport": "prepare",
    "benchmark": "bench", "BenchResult": "bench",
    "save": "serialize", "load": "serialize", "LoadError": "serialize",
}


def __getattr__(name: str):
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
    "Gates",
    "SaliencyGenerator",
    "kept_channel_count",
    "convert",
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
    "ConversionError",
    "IdentityCheckError",
    "RecipeError",
    "UnknownModelError",
    "Recipe",
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
    "__version__",
]
