"""Shapes of a model's activations, found without running the model itself.

A copy with meta weights runs on fake tensors, so any input size costs no memory and nothing a
forward caches lands in the user's model. MAC counting (``measuring.macs``) and the surgery's
choice of image convolutions both ask here.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dgc_convert.conversion.tracing import meta_twin
from dgc_convert.nn.modes import dgc_mode

__all__ = ["normalize_input_size", "run_on_copy", "convolution_output_sizes"]

Result = TypeVar("Result")


def normalize_input_size(input_size: int | Sequence[int], channels: int = 3) -> tuple[int, int, int]:
    """(channels, height, width) from an int (square), (height, width) or (channels, height, width)."""
    size: tuple[int, ...]
    if isinstance(input_size, int):
        size = (channels, input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (channels, *size)
    if len(size) != 3 or any(v < 1 for v in size):
        raise ValueError(f"input_size must be N, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    return size  # type: ignore[return-value]


def run_on_copy(model: nn.Module, input_size: int | Sequence[int], run: Callable[..., Result]) -> Result:
    """``run(copy, example, fake=...)`` on a copy of ``model`` and one zero input of ``input_size``.

    A copy with meta tensors for weights (``tracing.meta_twin``: no storage)
    on fake tensors, so any input size runs in bounded memory and nothing a
    forward caches lands in ``model``; where fake tensors fail (an operator
    without a shape rule), a real copy on a real input, once.
    """
    size = normalize_input_size(input_size)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        return run(meta_twin(model), torch.zeros(1, *size, device="meta", dtype=dtype), fake=True)
    except Exception:  # any operator fake tensors cannot run: a real copy, once
        device = parameter.device if parameter is not None else torch.device("cpu")
        return run(copy.deepcopy(model), torch.zeros(1, *size, device=device, dtype=dtype), fake=False)


def convolution_output_sizes(model: nn.Module, input_size: int | Sequence[int]) -> dict[str, tuple[int, int]]:
    """Output (height, width) in pixels of every ``nn.Conv2d`` of ``model`` for one
    input of ``input_size``, by name; a convolution the forward does not call is absent.

    Shapes only, and ``model`` itself never runs: see ``run_on_copy``.
    """
    return run_on_copy(model, input_size, _output_sizes)


def _output_sizes(model: nn.Module, example: torch.Tensor, *, fake: bool) -> dict[str, tuple[int, int]]:
    """Run ``model`` (a copy: its mode and hooks are changed) once on ``example`` and
    record every ``nn.Conv2d``'s output (height, width)."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sizes.setdefault(name, (int(output.shape[2]), int(output.shape[3])))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(record(name))
    model.eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    # DGC layers in their graph form: no timing of sparse algorithms on a one-off input.
    with mode, dgc_mode(model, algorithm="export"), torch.no_grad():
        model(example)
    return sizes
