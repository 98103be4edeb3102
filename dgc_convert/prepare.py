"""Get a model ready to serve: fold BatchNorm into the convolution before it,
arrange DGC weights for gathering, switch to eval mode.

Folding is valid for DGC layers too: BatchNorm scales and shifts each output
channel, and a DGC layer gates input channels, so the per-output-channel
affine map moves into the filters and bias unchanged. Which BatchNorm follows
which convolution is read from a ``torch.fx`` trace (DGC layers are leaves);
a model that cannot be traced keeps its BatchNorms, and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.tracing import trace, trace_error

__all__ = ["InferenceReport", "prepare_for_inference", "fold_batchnorm"]


@dataclass
class InferenceReport:
    """What ``prepare_for_inference`` did: folded (conv, batchnorm) pairs, and why not more."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)  # (batchnorm name, reason)
    dgc_layers: int = 0
    trace_error: str | None = None


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d | DGCConv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode ``bn`` that directly follows ``conv`` into its weight and bias, in place."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("fold_batchnorm needs a BatchNorm with running statistics")
    inverse_std = torch.rsqrt(var + bn.eps)
    scale = bn.weight * inverse_std if bn.affine else inverse_std
    shift = bn.bias if bn.affine else torch.zeros_like(mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
    new_bias = (bias - mean) * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, child = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _foldable_pairs(model: nn.Module, report: InferenceReport) -> list[tuple[str, str]]:
    try:
        graph = trace(model)
    except Exception as error:  # tracing arbitrary models fails in many ways; folding is optional
        report.trace_error = trace_error(error)
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        bn = modules[node.target]
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            report.not_folded.append((node.target, "does not directly follow a convolution"))
            continue
        conv = modules.get(str(source.target))
        if not isinstance(conv, (nn.Conv2d, DGCConv2d)) or (
            isinstance(conv, nn.Conv2d) and type(conv).forward is not nn.Conv2d.forward
        ):
            report.not_folded.append((node.target, "does not directly follow a convolution"))
        elif len(source.users) != 1:
            report.not_folded.append((node.target, f"{source.target}'s output is also used elsewhere"))
        elif calls[str(node.target)] != 1 or calls[str(source.target)] != 1:
            report.not_folded.append((node.target, "module called more than once"))
        elif not bn.track_running_stats or bn.running_var is None:
            report.not_folded.append((node.target, "no running statistics"))
        else:
            pairs.append((str(source.target), str(node.target)))
    return pairs


def prepare_for_inference(model: nn.Module) -> InferenceReport:
    """Prepare ``model`` for serving, in place: eval mode, BatchNorm folded into
    the convolutions (dense and DGC) they follow, DGC weights pre-arranged for
    the sparse inference path. Outputs equal the unprepared model's in eval
    mode (up to float rounding). Train again only after rebuilding the model.
    """
    model.eval()
    report = InferenceReport()
    for conv_name, bn_name in _foldable_pairs(model, report):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, (nn.Conv2d, DGCConv2d)) and isinstance(
            bn, nn.BatchNorm2d
        )  # as _foldable_pairs found them
        fold_batchnorm(conv, bn)
        parent, child = _parent_and_name(model, bn_name)
        setattr(parent, child, nn.Identity())
        report.folded.append((conv_name, bn_name))
    for module in model.modules():
        if isinstance(module, DGCConv2d):
            module._weight_cache.get(module.weight, module.heads)
            report.dgc_layers += 1
    model.dgc_prepared_for_inference = True  # type: ignore[assignment]  # ``save`` refuses: folded BatchNorms cannot be rebuilt by name
    return report
