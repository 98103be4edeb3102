"""Checkpoints: weights in safetensors, state in JSON, written atomically, never unpickled.

A checkpoint directory (a run's ``last/`` or ``best/``) holds the model as ``dgc_convert.save``
writes it, the optimizer, scaler and generator tensors, and the ``RunState``; a new one replaces
the old by rename, so a cut save leaves the previous one whole. The files and the swap:
``docs/files.md``, "Checkpoints".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from dgc_convert._version import __version__
from dgc_convert.conversion.saved_models import model_metadata
from dgc_convert.errors import CheckpointError
from dgc_convert.files.atomic import give_default_mode, make_directory, naming_os_errors
from dgc_convert.files.checkpoint_dirs import find_checkpoint, recover, set_aside
from dgc_convert.files.names import MODEL_FILE, STATE_FILE, TRAINING_FILE
from dgc_convert.files.processes import pid_alive

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "RunState",
    "RunStatus",
    "find_checkpoint",
    "flatten_tensors",
    "load_optimizer_state",
    "read_checkpoint",
    "save_checkpoint",
    "sweep_checkpoints",
    "unflatten_tensors",
]

CHECKPOINT_FORMAT = "dgc-convert-checkpoint/1"
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


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
    """Inverse of ``flatten_tensors``.

    Dict keys come back as the strings they were stored as (JSON has no other
    keys); ``load_optimizer_state`` turns an optimizer's parameter indices
    back into integers.
    """
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


RunStatus = Literal["running", "interrupted", "finished", "best"]
_STATUSES = ("running", "interrupted", "finished", "best")


@dataclass
class RunState:
    """Where a training run stands, as ``state.json`` records it.

    ``status`` is ``running`` (a periodic ``last``), ``interrupted``,
    ``finished`` or ``best``. Counts: ``epochs_completed`` whole epochs,
    ``iteration`` optimizer steps in all, ``epoch_iteration`` steps into the
    epoch under way (0 at an epoch boundary). ``progress`` and
    ``zeta_fraction`` are the schedule's values at ``iteration`` (both in
    [0, 1]); ``zeta_t`` maps each DGC layer's name to its current pruning
    ratio. ``image_size`` is the square side in pixels; ``best_top1`` a
    held-out top-1 percentage (None before an epoch at the target ratio);
    ``metrics`` the last epoch's ``EpochMetrics`` as a dict (None before the
    first); ``wall_seconds`` the wall-clock seconds spent training so far,
    over every resumption.
    """

    status: RunStatus
    recipe: dict[str, Any]
    epochs_completed: int
    iteration: int
    epoch_iteration: int
    iterations_per_epoch: int
    total_iterations: int
    progress: float
    zeta_fraction: float
    zeta_t: dict[str, float]
    image_size: int
    num_classes: int
    world_size: int
    best_top1: float | None
    metrics: dict[str, Any] | None
    wall_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The state as plain JSON data (the keys of ``state.json``, in this order)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str | Path = STATE_FILE) -> RunState:
        """Read a run state from JSON data (a whole ``state.json`` will do: its file keys are skipped).

        Raises:
            CheckpointError: one line naming ``source`` and the first key that
                is missing or has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: the run state should be a JSON object, found {type(data).__name__}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise CheckpointError(f"{source}: the run state has no {f.name!r}; not a complete trainer checkpoint")
            check, what = _RUN_STATE_CHECKS[f.name]
            try:
                values[f.name] = check(data[f.name])
            except (TypeError, ValueError):
                shown = repr(data[f.name])
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise CheckpointError(f"{source}: {f.name!r} should be {what}, found {shown}") from None
        return cls(**values)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    return float(value)


def _optional(check: Any) -> Any:
    return lambda value: None if value is None else check(value)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError
    return value


def _ratios(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError
    return {str(name): _number(ratio) for name, ratio in value.items()}


def _status(value: Any) -> str:
    if value not in _STATUSES:
        raise ValueError
    return value


_RUN_STATE_CHECKS: dict[str, tuple[Any, str]] = {
    "status": (_status, f"one of {', '.join(_STATUSES)}"),
    "recipe": (_object, "a JSON object (the recipe)"),
    "epochs_completed": (_integer, "a count (integer >= 0)"),
    "iteration": (_integer, "a count (integer >= 0)"),
    "epoch_iteration": (_integer, "a count (integer >= 0)"),
    "iterations_per_epoch": (_integer, "a count (integer >= 0)"),
    "total_iterations": (_integer, "a count (integer >= 0)"),
    "progress": (_number, "a number"),
    "zeta_fraction": (_number, "a number"),
    "zeta_t": (_ratios, "a JSON object of layer names to numbers"),
    "image_size": (_integer, "a size in pixels (integer >= 0)"),
    "num_classes": (_integer, "a count (integer >= 0)"),
    "world_size": (_integer, "a count (integer >= 0)"),
    "best_top1": (_optional(_number), "a number or null"),
    "metrics": (_optional(_object), "a JSON object or null"),
    "wall_seconds": (_number, "a number of seconds"),
}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], source: str | Path = TRAINING_FILE
) -> None:
    """Load an optimizer state read back from a checkpoint into ``optimizer``.

    ``saved`` is ``optimizer.state_dict()`` as ``Checkpoint.training_state``
    returns it: its per-parameter ``state`` keyed by the parameter indices as
    strings. They become integers again (what ``load_state_dict`` matches on).

    Raises:
        CheckpointError: one line naming ``source`` when the state is malformed
            or does not fit ``optimizer`` (other parameters, other groups).
    """
    try:
        state = {int(index): value for index, value in saved["state"].items()}
        optimizer.load_state_dict({**saved, "state": state})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{source}: the optimizer state does not fit this run's optimizer: {detail}") from None


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    state: RunState | Mapping[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``directory``, replacing any old one only once the new one is complete.

    Args:
        directory: the checkpoint directory (``.../last``), created if needed.
        model: the (unwrapped) model whose state dict is saved.
        state: the ``RunState`` (or any JSON-able mapping) for ``state.json``.
        training_state: optimizer / scaler / generator states (any nesting of
            dicts, lists and tensors); tensors go to ``training.safetensors``.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    state = state.to_json() if isinstance(state, RunState) else dict(state)
    make_directory(directory.parent)
    checkpoint_id = uuid.uuid4().hex
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
    except OSError as error:  # name the checkpoint asked for, not our hidden temporary one
        raise OSError(error.errno, error.strerror, str(directory)) from None
    try:
        with naming_os_errors(directory):  # a full disk: an OSError naming the checkpoint
            _write_checkpoint(temporary, model, state, training_state, checkpoint_id)
    except BaseException:
        # A full disk, an unwritable file, Ctrl-C: leave no half-written directory behind.
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    # Swap: old -> .old, new -> name, drop .old. At every instant one complete
    # checkpoint exists under the name or under .old (``find_checkpoint`` looks at both).
    previous = set_aside(directory)
    recover(directory)  # a save that died between renames: its .old is the checkpoint, keep it
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)
    return directory


def _write_checkpoint(
    temporary: Path,
    model: nn.Module,
    state: dict[str, Any],
    training_state: dict[str, Any] | None,
    checkpoint_id: str,
) -> None:
    """Write the checkpoint's files into ``temporary``."""
    metadata = {"checkpoint_id": checkpoint_id, "dgc_convert_version": __version__}
    if getattr(model, "dgc_model_info", None) is not None:
        # The same metadata as ``dgc_convert.save``: ``load`` opens trainer checkpoints.
        metadata.update(model_metadata(model, state.get("image_size")))
    if "recipe" in state:
        metadata["recipe"] = json.dumps(state["recipe"])
    save_model(model, str(temporary / MODEL_FILE), metadata=metadata)
    full_state = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint_id": checkpoint_id,
        "dgc_convert_version": __version__,
        **state,
    }
    if training_state is not None:
        skeleton, tensors = flatten_tensors(training_state)
        save_file(tensors, str(temporary / TRAINING_FILE), metadata={"checkpoint_id": checkpoint_id})
        full_state["training_state"] = skeleton
    _write_json(temporary / STATE_FILE, full_state)
    give_default_mode(*(path for path in temporary.iterdir() if path.is_file()))


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def sweep_checkpoints(output: str | Path, *, owned: bool = False) -> list[Path]:
    """Tidy a run's output directory after a crash; returns the temporary directories removed.

    Removes the ``.NAME.tmp-PID`` directories of saves that never finished,
    those whose process is gone (every one but this process's own when
    ``owned``: the caller holds the run lock, so no other save can be under
    way), puts back a checkpoint a save set aside (``.NAME.old``) when it died
    between its two renames, and drops a set-aside copy once the new checkpoint
    is in place.
    """

    output = Path(output)
    removed: list[Path] = []
    if not output.is_dir():
        return removed
    names: set[str] = set()
    for entry in output.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is not None and entry.is_dir():
            pid = int(match["pid"])
            if pid != os.getpid() and (owned or not pid_alive(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".old") and entry.is_dir():
            names.add(entry.name[1:-4])
    for name in sorted(names):
        directory = output / name
        with contextlib.suppress(OSError):
            recover(directory)
            if (directory / STATE_FILE).is_file():
                shutil.rmtree(set_aside(directory), ignore_errors=True)
    return removed


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its state, and loaders for weights and training state."""

    directory: Path
    state: dict[str, Any]

    @property
    def checkpoint_id(self) -> str:
        """The id every file of this checkpoint carries."""
        return str(self.state.get("checkpoint_id"))

    def run_state(self) -> RunState:
        """The trainer's ``RunState`` in ``state.json`` (``CheckpointError`` naming the key if malformed)."""
        return RunState.from_json(self.state, self.directory / STATE_FILE)

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
            state = unflatten_tensors(skeleton, tensors)
        except (OSError, SafetensorError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: cannot read: {error}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.directory / STATE_FILE}: training state is not a mapping")
        return state

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
        raise CheckpointError(
            f"{path}: not a dgc-convert checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})"
        )
    return Checkpoint(found, state)
