"""One ``torch.fx`` view of a model, with DGC layers kept whole: which module feeds which.

Used to fold BatchNorm into the convolution before it (``prepare``) and to
find the convolutions that see the image (``surgery``). Tracing arbitrary
models fails in many ways (data-dependent control flow, untraceable
helpers); callers fall back to a simpler rule and say so.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch.fx
from torch import nn

from dgc_convert.nn.layer import DGCConv2d

__all__ = ["LeafTracer", "trace", "trace_error", "image_convolutions", "meta_twin"]

_FUNCTIONAL_CONVS = {nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d}


class LeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps every DGC layer and every convolution,
    subclasses too (timm's ``StdConv2d``, ``Conv2dSame``), as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (DGCConv2d, nn.Conv2d)) or super().is_leaf_module(module, qualified_name)


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (shapes,
    no storage): nothing is copied but the structure, and whatever a forward stores
    in its modules (a cache, a traced proxy) lands in the copy, not in ``model``."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The model's graph with DGC layers as leaves (module names as in ``model``); raises
    whatever tracing raises. A ``meta_twin`` is traced: tracing runs forward with proxies,
    and a forward that stores its input would otherwise keep one in ``model``."""
    return LeafTracer().trace(meta_twin(model))


def trace_error(error: Exception) -> str:
    """One line describing why tracing failed."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def image_convolutions(model: nn.Module) -> set[str] | None:
    """Names of the convolutions that receive the image: no other convolution
    lies between the model's input and them. None when the model cannot be traced."""
    try:
        graph = trace(model)
    except Exception:  # any tracing failure means: use the caller's fallback rule
        return None
    modules = dict(model.named_modules())
    after_conv: set[torch.fx.Node] = set()
    found: set[str] = set()
    for node in graph.nodes:
        fed_by_conv = any(parent in after_conv for parent in node.all_input_nodes)
        is_module = node.op == "call_module" and isinstance(modules.get(str(node.target)), (nn.Conv2d, DGCConv2d))
        is_conv = is_module or (node.op == "call_function" and node.target in _FUNCTIONAL_CONVS)
        if is_module and not fed_by_conv and node.all_input_nodes:
            found.add(str(node.target))
        if is_conv or fed_by_conv:
            after_conv.add(node)
    return found
