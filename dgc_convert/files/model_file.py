"""Where a model file is, and which format it says it is: the facts every reader of our files shares."""

from __future__ import annotations

from pathlib import Path

from dgc_convert.errors import LoadError
from dgc_convert.files.checkpoint_dirs import find_checkpoint
from dgc_convert.files.names import LAST_CHECKPOINT, MODEL_FILE

__all__ = ["MODEL_FORMAT", "weights_file"]

# The "format" metadata of a file ``dgc_convert.save`` (or a trainer checkpoint) writes: NAME/VERSION.
MODEL_FORMAT = "dgc-convert-model/1"


def weights_file(path: Path, error: type[LoadError] = LoadError) -> Path:
    """The file ``path`` names: itself, or a checkpoint directory's ``model.safetensors``;
    ``error`` (one line naming the path) when there is none. A checkpoint whose save was cut
    between its two renames is found where ``--resume`` finds it (``find_checkpoint``)."""
    if not path.is_file() and not (path / MODEL_FILE).is_file():
        found = find_checkpoint(path)
        if found is not None and (found / MODEL_FILE).is_file():
            return found / MODEL_FILE
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            hint = (
                " (a run's checkpoints are its last/ and best/ directories)"
                if (path / LAST_CHECKPOINT).is_dir()
                else ""
            )
            raise error(f"{path}: a directory without {MODEL_FILE}{hint}")
        return candidate
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file")
    return path
