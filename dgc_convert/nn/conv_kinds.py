"""What a source convolution computes beyond ``nn.Conv2d``, so a DGC layer can compute it too.

timm builds whole model families from ``nn.Conv2d`` subclasses whose forward
transforms the weight or the input first:

- ``StdConv2d`` (BiT, ResNetV2): weight standardisation, each output
  channel's filter shifted to mean 0 and scaled to variance 1 (``eps`` inside
  the square root), computed on every call;
- ``ScaledStdConv2d`` (NFNets, NF-ResNets): the same, times a learned
  per-channel ``gain`` and a fixed ``scale`` = gamma / sqrt(fan-in);
- ``Conv2dSame`` and the ``...Same`` variants (TF-ported EfficientNets,
  MobileNets, NFNet-F): TensorFlow's 'SAME' padding, computed from the input
  size on every call and one pixel larger on the bottom/right when odd.

``conv_kind`` recognises them by their forward (a subclass that overrides it
computes something else and is not recognised); ``standardize_weight`` and
``same_padding`` are the two transforms, written with the operators timm
uses, so a converted layer at zeta 0 with unit scores equals its original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WeightStandardization", "ConvKind", "conv_kind", "standardize_weight", "same_padding", "pad_input"]


@dataclass(frozen=True)
class WeightStandardization:
    """How a layer standardises its weight before convolving.

    ``eps``: added to each filter's variance. ``scale``: ``ScaledStdConv2d``'s
    gamma / sqrt(fan-in), applied with the layer's learned per-channel
    ``gain``; None for plain ``StdConv2d`` (no gain).
    """

    eps: float
    scale: float | None = None

    @property
    def has_gain(self) -> bool:
        """True when the layer holds a learned ``gain`` (``ScaledStdConv2d``)."""
        return self.scale is not None


@dataclass(frozen=True)
class ConvKind:
    """What a convolution computes beyond ``nn.Conv2d``: its weight standardisation
    (None when it uses the weight as it is) and whether it pads TF-'SAME' on the fly."""

    standardization: WeightStandardization | None = None
    same_padding: bool = False


def standardize_weight(weight: Tensor, standardization: WeightStandardization, gain: Tensor | None = None) -> Tensor:
    """``weight`` (C', C, kh, kw) standardised per output channel as timm's
    ``StdConv2d`` / ``ScaledStdConv2d`` do (the same ``F.batch_norm`` call:
    biased variance, ``eps`` inside the root); ``gain`` (C', 1, 1, 1) times
    ``standardization.scale`` multiplies the result when the layer has one."""
    factor = None
    if standardization.scale is not None:
        if gain is None:
            raise ValueError("a scaled weight standardisation needs the layer's gain")
        factor = (gain * standardization.scale).view(-1)
    flat = weight.reshape(1, weight.shape[0], -1)
    standardized = F.batch_norm(flat, None, None, weight=factor, training=True, momentum=0.0, eps=standardization.eps)
    return standardized.reshape_as(weight)


def same_padding(
    input_size: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding (left, right, top, bottom) in pixels for an input of
    ``input_size`` (height, width): the output is ceil(size / stride), and an odd
    total puts the extra pixel on the right/bottom. timm's own helper computes it."""
    from timm.layers.padding import pad_same_arg  # imported on demand: only these layers need timm

    # Not int(): while torch.export traces with a dynamic size these are symbolic,
    # and converting them would fix the padding to the traced size's.
    left, right, top, bottom = pad_same_arg(list(input_size), list(kernel_size), list(stride), list(dilation))
    return (left, right, top, bottom)


def pad_input(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """``x`` zero-padded by (left, right, top, bottom); ``x`` itself when every pad is a plain 0
    (symbolic pads, while a graph is traced, always pad)."""
    if all(isinstance(p, int) and p == 0 for p in pads):
        return x
    return F.pad(x, pads)


def _from_timm(conv: nn.Conv2d) -> bool:
    return any(cls.__module__.startswith("timm.") for cls in type(conv).__mro__)


def conv_kind(conv: nn.Conv2d) -> ConvKind | None:
    """What ``conv`` computes, when a DGC layer can reproduce it: ``nn.Conv2d``'s
    own forward, or one of timm's ``StdConv2d``, ``StdConv2dSame``,
    ``ScaledStdConv2d``, ``ScaledStdConv2dSame`` and ``Conv2dSame``. None for any
    other forward (its weight or input is computed in a way we do not know)."""
    forward = type(conv).forward
    if forward is nn.Conv2d.forward:
        return ConvKind()
    if not _from_timm(conv):
        return None
    # timm is already imported: the conv is one of its classes.
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    eps = float(getattr(conv, "eps", 0.0))
    # ``same_pad`` is False where 'SAME' happens to be static (stride 1, odd
    # kernel): those pad by their numeric ``padding`` like nn.Conv2d.
    dynamic = bool(getattr(conv, "same_pad", False))
    if forward is StdConv2d.forward:
        return ConvKind(WeightStandardization(eps))
    if forward is StdConv2dSame.forward:
        return ConvKind(WeightStandardization(eps), dynamic)
    # nn.Module's __getattr__ types plain attributes as Tensor | Module: read it directly.
    scale = float(vars(conv).get("scale", 1.0))
    if forward is ScaledStdConv2d.forward:
        return ConvKind(WeightStandardization(eps, scale))
    if forward is ScaledStdConv2dSame.forward:
        return ConvKind(WeightStandardization(eps, scale), dynamic)
    if forward is Conv2dSame.forward:
        return ConvKind(same_padding=True)
    return None
