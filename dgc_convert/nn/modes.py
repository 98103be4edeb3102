"""One switch for how DGC layers compute, undone on exit.

MAC counting, export, the identity check and benchmarks all need every DGC
layer in some mode for a moment (the graph form, unit scores, zeta 0, one
algorithm); ``dgc_mode`` sets it and restores each layer exactly as it was,
even when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from dgc_convert.nn.layer import DGCConv2d

__all__ = ["dgc_mode", "find_dgc_layers", "watch_scores"]


def find_dgc_layers(model_or_layers: nn.Module | Iterable[DGCConv2d]) -> list[DGCConv2d]:
    """Every DGC layer of a model in module order, or the given layers as a list."""
    if isinstance(model_or_layers, nn.Module):
        return [m for m in model_or_layers.modules() if isinstance(m, DGCConv2d)]
    return list(model_or_layers)


@contextlib.contextmanager
def dgc_mode(
    model_or_layers: nn.Module | Iterable[DGCConv2d],
    *,
    algorithm: str | None = None,
    unit_scores: bool | None = None,
    zeta_t: float | None = None,
    zeta_fraction: float | None = None,
) -> Iterator[list[DGCConv2d]]:
    """Set every DGC layer's ``inference_algorithm``, ``unit_scores`` and/or
    ``zeta_t`` for the ``with`` block; None leaves that setting alone.
    ``zeta_fraction`` sets each layer's ``zeta_t`` to that fraction of its own
    target ``zeta`` instead (layers with per-layer targets move together).

    Yields the layers. On exit each layer gets back its own previous values.
    A bad algorithm name raises ``ValueError`` before any layer changes.
    """
    layers = find_dgc_layers(model_or_layers)
    saved = [(layer.inference_algorithm, layer.unit_scores, layer.zeta_t_value) for layer in layers]
    try:
        for layer in layers:
            if algorithm is not None:
                layer.inference_algorithm = algorithm
            if unit_scores is not None:
                layer.unit_scores = unit_scores
            if zeta_t is not None:
                layer.set_zeta_t(zeta_t)
            elif zeta_fraction is not None:
                layer.set_zeta_t(layer.zeta * zeta_fraction)
        yield layers
    finally:
        for layer, (old_algorithm, old_unit, old_zeta_t) in zip(layers, saved):
            layer.inference_algorithm = old_algorithm
            layer.unit_scores = old_unit
            if layer.zeta_t_value != old_zeta_t:
                layer.set_zeta_t(old_zeta_t)


@contextlib.contextmanager
def watch_scores(
    named_layers: Iterable[tuple[str, DGCConv2d]],
    callback: Callable[[str, DGCConv2d, Tensor, Tensor], None],
) -> Iterator[None]:
    """Call ``callback(name, layer, scores, output)`` after every forward of
    each layer inside the block: ``scores`` (batch, heads, in_channels) as the
    layer computes them (``unit_scores`` included), ``output`` its result."""

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            assert isinstance(module, DGCConv2d)
            callback(name, module, module.saliency(args[0]).detach(), output)

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in named_layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
