"""Checkpoints: weights in safetensors, state in JSON, written atomically, never unpickled.

A checkpoint is a directory (``last/`` or ``best/`` in a run's output
directory) holding:

- ``model.safetensors``: the model's state dict (DGC ``zeta_t`` buffers
  included), with ``dgc_convert.save``'s metadata (so ``dgc_convert.load``
  opens it) and the recipe;
- ``training.safetensors``: every tensor of the optimizer, gradient scaler and
  random generators (only in ``last/``);
- ``state.json``: recipe, epochs and iterations done, zeta_t, metrics, and the
  non-tensor part of the training state, with placeholders where tensors go.

A new checkpoint is written to a temporary directory that then replaces the
old one by rename, so an interrupted save leaves the previous checkpoint
whole. Every file carries the same random ``checkpoint_id``; loading checks it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from dgc_convert import __version__
from dgc_convert.errors import DGCConvertError

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "read_checkpoint",
    "find_checkpoint",
    "flatten_tensors",
    "unflatten_tensors",
]

CHECKPOINT_FORMAT = "dgc-convert-checkpoint/1"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


class CheckpointError(DGCConvertError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def flatten_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split nested dicts/lists/tuples into a JSON-able skeleton and a flat ``{key: tensor}`` map.

    Tensors are replaced by ``{"__tensor__": key}``; tuples are tagged so they
    come back as tuples (``random.setstate`` insists). Dict keys become strings.
    """
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensors[path] = node.detach().to("cpu").contiguous()
            return {_TENSOR_TAG: path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, tuple):
            return {_TUPLE_TAG: [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return {"__float__": repr(node)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path!r} in a checkpoint")

    return walk(tree, prefix), tensors


def unflatten_tensors(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``flatten_tensors``. Integer-like dict keys stay strings; callers convert."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_TAG}:
            return tensors[skeleton[_TENSOR_TAG]]
        if set(skeleton) == {_TUPLE_TAG}:
            return tuple(unflatten_tensors(v, tensors) for v in skeleton[_TUPLE_TAG])
        if set(skeleton) == {"__float__"}:
            return float(skeleton["__float__"])
        return {k: unflatten_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_tensors(v, tensors) for v in skeleton]
    return skeleton


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    state: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``directory``, replacing any old one only once the new one is complete.

    Args:
        directory: the checkpoint directory (``.../last``), created if needed.
        model: the (unwrapped) model whose state dict is saved.
        state: JSON-able run state (recipe, epochs, iterations, zeta_t, metrics).
        training_state: optimizer / scaler / generator states (any nesting of
            dicts, lists and tensors); tensors go to ``training.safetensors``.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_id = uuid.uuid4().hex
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    metadata = {"checkpoint_id": checkpoint_id, "dgc_convert_version": __version__}
    if getattr(model, "dgc_model_info", None) is not None:
        # The same metadata as ``dgc_convert.save``: ``load`` opens trainer checkpoints.
        from dgc_convert.serialize import model_metadata

        metadata.update(model_metadata(model, state.get("image_size")))
    if "recipe" in state:
        metadata["recipe"] = json.dumps(state["recipe"])
    save_model(model, str(temporary / MODEL_FILE), metadata=metadata)
    full_state = {"format": CHECKPOINT_FORMAT, "checkpoint_id": checkpoint_id, "dgc_convert_version": __version__, **state}
    if training_state is not None:
        skeleton, tensors = flatten_tensors(training_state)
        save_file(tensors, str(temporary / TRAINING_FILE), metadata={"checkpoint_id": checkpoint_id})
        full_state["training_state"] = skeleton
    _write_json(temporary / STATE_FILE, full_state)
    # Swap: old -> .old, new -> name, drop .old. At every instant one complete
    # checkpoint exists under the name or under .old (``find_checkpoint`` looks at both).
    previous = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)
    return directory


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at ``directory`` (or the one a save in progress set aside), or None."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(f".{directory.name}.old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its state, and loaders for weights and training state."""

    directory: Path
    state: dict[str, Any]

    @property
    def checkpoint_id(self) -> str:
        """The id every file of this checkpoint carries."""
        return str(self.state.get("checkpoint_id"))

    def load_weights(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        """Load the weights into ``model`` (strict: every key must match)."""
        path = self.directory / MODEL_FILE
        self._check_id(path)
        try:
            load_model(model, str(path), strict=True, device=str(device))
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise CheckpointError(f"{path}: does not fit the model built from the recipe: {detail[:300]}") from None

    def training_state(self) -> dict[str, Any]:
        """The optimizer / scaler / generator states saved with ``last``."""
        skeleton = self.state.get("training_state")
        if skeleton is None:
            raise CheckpointError(f"{self.directory}: holds weights only (no optimizer state); resume needs last/")
        path = self.directory / TRAINING_FILE
        self._check_id(path)
        try:
            tensors = load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: cannot read: {error}") from None
        return unflatten_tensors(skeleton, tensors)

    def _check_id(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                found = (handle.metadata() or {}).get("checkpoint_id")
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
        if found != self.checkpoint_id:
            raise CheckpointError(f"{path}: belongs to a different save than {self.directory / STATE_FILE}")


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read the checkpoint at ``directory`` (its ``state.json``); tensors load on demand."""
    found = find_checkpoint(directory)
    if found is None:
        raise CheckpointError(f"{directory}: no checkpoint there (expected {STATE_FILE})")
    path = found / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read: {error}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dgc-convert checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return Checkpoint(found, state)
