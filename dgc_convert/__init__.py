"""dgc-convert: Dynamic Group Convolution for any timm or torchvision CNN.

The public API is re-exported here; see README.md for a tour.
"""

__version__ = "0.1.0"  # before the imports below: checkpoint.py records it

from dgc_convert.errors import ConversionError, DGCConvertError, IdentityCheckError, RecipeError, UnknownModelError
from dgc_convert.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count
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
from dgc_convert.recipe import Recipe, load_recipe
from dgc_convert.schedule import Schedule
from dgc_convert.train import EpochMetrics, TrainingDiverged, TrainResult, train
from dgc_convert.prepare import InferenceReport, prepare_for_inference
from dgc_convert.bench import BenchResult, benchmark
from dgc_convert.serialize import LoadError, load, save

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
