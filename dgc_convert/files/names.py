"""Every file name dgc-convert writes or looks for, in one place."""

from __future__ import annotations

__all__ = [
    "MODEL_FILE",
    "TRAINING_FILE",
    "STATE_FILE",
    "RECIPE_FILE",
    "METRICS_FILE",
    "CURVES_FILE",
    "TENSORBOARD_DIR",
    "LOCK_FILE",
    "LAST_CHECKPOINT",
    "BEST_CHECKPOINT",
    "SAFETENSORS_SUFFIX",
    "TORCH_SUFFIXES",
    "WEIGHTS_SUFFIXES",
]

# A checkpoint directory (a run's last/ and best/): the model as ``dgc_convert.save`` writes it,
# the optimizer and schedule state, and the run's progress.
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"

# What a run writes into its output directory (rank 0), besides its checkpoints.
RECIPE_FILE = "recipe.yaml"  # the recipe, every default filled in
METRICS_FILE = "metrics.jsonl"  # one JSON line per epoch: an EpochMetrics
CURVES_FILE = "curves.png"  # top-1, loss, zeta_t and MACs per sample vs epoch, redrawn after every epoch
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files, with train.tensorboard: true
LOCK_FILE = ".lock"  # held for a run's whole life: one run per output directory
LAST_CHECKPOINT = "last"  # the newest epoch's checkpoint directory
BEST_CHECKPOINT = "best"  # the best held-out top-1's checkpoint directory

# A dense weights file (``model.checkpoint``, ``--checkpoint``), known by its suffix.
SAFETENSORS_SUFFIX = ".safetensors"
# Files torch.save writes under the names people give them (.bin: Hugging Face's pytorch_model.bin).
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHTS_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
