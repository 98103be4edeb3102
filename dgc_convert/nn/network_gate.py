"""DGC-G: learning the one network-wise threshold T from the scores training forwards record.

``update_threshold`` finds the batch threshold at which the kept MAC fraction meets the target,
averages it across ranks and moves T towards it by a running average; every network-gated layer
holds the same T, saved with the weights. The steps: ``docs/training.md``, "DGC-G: learning the
threshold" (and ``docs/method.md`` section 8).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import find_dgc_layers

__all__ = ["THRESHOLD_MOMENTUM", "network_gated", "untrained_threshold", "batch_threshold", "update_threshold"]

# Weight of the newest batch in T's moving average (BatchNorm's default
# momentum: about the last ten batches count).
THRESHOLD_MOMENTUM = 0.1


def network_gated(model_or_layers: nn.Module | Iterable[DGCConv2d]) -> list[DGCConv2d]:
    """The network-gated DGC layers of a model (or of a list of layers), in module order."""
    return [layer for layer in find_dgc_layers(model_or_layers) if layer.gating == "network"]


def untrained_threshold(model_or_layers: nn.Module | Iterable[DGCConv2d]) -> bool:
    """True when the model is network-gated and its threshold is still the initial 0
    (never trained): it then keeps every positive-score channel, not its target."""
    return any(layer.threshold_value == 0.0 for layer in network_gated(model_or_layers))


def _records(layers: list[DGCConv2d]) -> list[tuple[DGCConv2d, Tensor, int]]:
    """(layer, scores, output pixels) of every layer that ran a training forward
    since the last update; a layer a forward skipped (a conditional branch) adds nothing."""
    found = []
    for layer in layers:
        if layer.last_gate_record is not None:
            scores, pixels = layer.last_gate_record
            found.append((layer, scores, pixels))
            layer.last_gate_record = None
    if not found:
        raise RuntimeError(
            "update_threshold needs a training-mode forward of the network-gated layers first "
            "(call it after the forward of each training step)"
        )
    return found


def batch_threshold(records: Iterable[tuple[Tensor, int, float]]) -> float | None:
    """The score at which the MAC-weighted kept fraction of these entries equals the target.

    ``records``: per layer (scores of any shape, MACs each entry costs when
    kept, the fraction of that layer's MACs to keep ``1 - zeta_t``). Returns
    the threshold T such that keeping the entries with score > T keeps
    ``sum(cost * keep) / sum(cost)`` of the MACs, up to the entry the target
    falls in; entries tied at T are all dropped, so many equal scores at the
    cut (zeros, for instance) keep less. None when every fraction is 1 (nothing to drop).
    """
    scores, costs, wanted, total = [], [], 0.0, 0.0
    for layer_scores, cost, keep in records:
        flat = layer_scores.detach().reshape(-1).double()
        scores.append(flat)
        costs.append(torch.full_like(flat, float(cost)))
        wanted += float(cost) * flat.numel() * keep
        total += float(cost) * flat.numel()
    if not scores or wanted >= total:
        return None
    all_scores, all_costs = torch.cat(scores), torch.cat(costs)
    order = torch.argsort(all_scores, descending=True, stable=True)
    ranked = all_scores[order]
    kept_macs = torch.cumsum(all_costs[order], dim=0)
    # The first rank at which the kept MACs reach the target: entries up to it are kept.
    last = int(torch.searchsorted(kept_macs, torch.tensor(wanted, dtype=torch.float64)).clamp(max=ranked.numel() - 1))
    if last + 1 >= ranked.numel():
        return float(ranked[-1]) - 1.0
    return float(ranked[last] + ranked[last + 1]) / 2.0


@torch.no_grad()
def update_threshold(
    model_or_layers: nn.Module | Iterable[DGCConv2d], *, momentum: float = THRESHOLD_MOMENTUM
) -> float | None:
    """One step of T after a training forward (see the module docstring); returns the new T.

    Call it once per training step, after the forward (the trainer does). A
    no-op returning None for a model without network-gated layers or while
    every ``zeta_t`` is 0. Under an initialised torch.distributed process
    group it all-reduces the batch threshold, so every rank holds the same T.
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    layers = network_gated(model_or_layers)
    if not layers:
        return None
    records = _records(layers)
    target = batch_threshold(
        (scores, layer.kept_channel_macs(pixels, 1), 1.0 - layer.zeta_t_value) for layer, scores, pixels in records
    )
    if target is None:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([target], dtype=torch.float64, device=records[0][1].device)
        dist.all_reduce(value)  # SUM: the mean below (gloo has no AVG)
        target = float(value) / dist.get_world_size()
    if not math.isfinite(target):
        # Non-finite scores (a diverging run): keep T; the training loop's
        # non-finite check reports the divergence. Every rank sees the same value.
        return None
    current = layers[0].threshold_value
    new = current + momentum * (target - current)
    for layer in layers:
        layer.set_threshold(new)
    return layers[0].threshold_value
