"""The Dynamic Group Convolution layer (Su et al., ECCV 2020).

`DGCConv2d` replaces one ``groups=1`` convolution. Its output channels are
split into ``heads`` contiguous blocks; each head owns a small saliency generator that
scores every input channel per sample, keeps the ``k`` highest-scoring
channels, scales them by their scores and convolves them with the head's
filters. The method is stated in ``docs/method.md``; this module holds
the method and nothing else (no surgery, no training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dgc_convert.nn.channel_order import interleaved_blocked_rows, interleaved_output_order, to_output_order
from dgc_convert.nn.conv_kinds import WeightStandardization, conv_kind, pad_input, same_padding, standardize_weight
from dgc_convert.nn.functional import gated_conv2d
from dgc_convert.nn.inference import InferencePlan
from dgc_convert.nn.saliency import SaliencyGenerator, saliency_hidden_width, saliency_macs
from dgc_convert.nn.settings import (
    DEFAULT_GATING,
    DEFAULT_HEADS,
    DEFAULT_SQUEEZE_RATIO,
    DEFAULT_SQUEEZE_RULE,
    DEFAULT_ZETA,
    GATINGS,
    SQUEEZE_RULES,
    LayerSettings,
)
from dgc_convert.nn.sparse import ALGORITHMS as SPARSE_ALGORITHMS
from dgc_convert.nn.tensor_state import tensor_state
from dgc_convert.nn.tracing_state import exporting, jit_tracing

__all__ = [
    "DGCConv2d",
    "SaliencyGenerator",
    "Gates",
    "kept_channel_count",
    "static_padding",
    "DEFAULT_HEADS",
    "DEFAULT_SQUEEZE_RATIO",
    "DEFAULT_ZETA",
    "DEFAULT_GATING",
    "DEFAULT_SQUEEZE_RULE",
    "GATINGS",
    "SQUEEZE_RULES",
    "INFERENCE_ALGORITHMS",
    "saliency_hidden_width",
    "saliency_macs",
    "kept_channel_macs",
]

# How eval mode may compute: "auto" (the compiled CPU op where it runs, else
# the fastest exact sparse algorithm for the case, timed once), "compiled"
# (the op or an error), one sparse algorithm by name ("masked" is the training
# computation), or "export" (the graph form ONNX and MAC counting use).
INFERENCE_ALGORITHMS: tuple[str, ...] = ("auto", "compiled", "export", *SPARSE_ALGORITHMS)


def kept_channel_count(in_channels: int, zeta: float) -> int:
    """Number of input channels each head keeps at pruning ratio ``zeta``.

    ``k = C - round(zeta * C)``, never fewer than one channel.
    """
    return max(1, in_channels - round(zeta * in_channels))


def kept_channel_macs(
    kernel_size: tuple[int, int], out_channels: int, heads: int, output_height: int, output_width: int
) -> int:
    """MACs per sample one head spends on one kept input channel: ``kh * kw * C'/H * H' * W'``
    (the convolution part of the method's cost formula, ``docs/method.md`` section 4)."""
    kh, kw = kernel_size
    return kh * kw * (out_channels // heads) * output_height * output_width


def _as_pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A 2-d convolution's per-axis setting as a pair (torch types them as any length)."""
    first, second = values
    return (first, second)


def static_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric padding equal to ``conv.padding`` ('valid', 'same' or numbers),
    or None where 'same' would pad one side more than the other."""
    if not isinstance(conv.padding, str):
        return _as_pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        reach = d * (k - 1)
        if reach % 2:
            return None
        pads.append(reach // 2)
    return (pads[0], pads[1])


def _check_zeta(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


class Gates(NamedTuple):
    """Per-sample gating of one DGC layer.

    ``scores``: saliency ``g`` of shape (batch, heads, in_channels), before
    gating. ``mask``: boolean, same shape, True where a head keeps the channel.
    """

    scores: Tensor
    mask: Tensor


class DGCConv2d(nn.Module):
    """Dynamic Group Convolution: a drop-in for a ``groups=1`` ``nn.Conv2d``.

    Same input and output shapes as the convolution it replaces. ``weight``
    keeps the dense layout ``(out_channels, in_channels, kh, kw)``; head ``i``
    owns the contiguous block of filters ``weight[i*n:(i+1)*n]`` with
    ``n = out_channels // heads``, so its outputs land where the dense
    convolution had them and no channel shuffle is needed. Output channel o is
    always computed with filter ``weight[o]``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias:
            as for ``nn.Conv2d`` (zeros padding, ``groups=1``).
        settings: the layer's DGC settings (``LayerSettings``: heads, squeeze
            ratio, zeta, layout, gating, pre-activation, squeeze rule, each
            documented there); the defaults when None. Any of its fields may
            also be given as a keyword (``heads=8``), on top of ``settings``.
            ``heads`` must divide ``out_channels``; the layer starts at
            ``zeta_t = zeta``, and a trainer moves ``zeta_t`` with
            ``set_zeta_t``. ``interleaved`` (the older layout, see the
            property) is set by ``dgc_convert.load`` for such files.
        standardization: standardise the weight per output channel before
            every use, as timm's ``StdConv2d`` / ``ScaledStdConv2d`` do (a
            ``WeightStandardization``; with a ``scale`` the layer holds a
            learned ``gain`` of shape (C', 1, 1, 1), initialised to 1). None:
            the weight is used as it is.
        same_padding: pad the convolution's input TensorFlow-'SAME' for its
            size on every call, as timm's ``Conv2dSame`` does (``padding`` is
            then added on top, normally 0). The saliency generator pools the
            unpadded input.

    Attributes:
        zeta_t: persistent buffer (saved in ``state_dict``) holding the ratio
            forward uses, so a trained model evaluates at the ratio it was
            trained to.
        unit_scores: when True every saliency score is 1 (not persistent);
            with ``zeta_t = 0`` the layer then equals its dense convolution.
        inference_algorithm: how eval mode computes (not persistent):
            "auto" (default: the compiled CPU op ``dgc_convert::dgc_conv2d``
            for float32 on CPU when it could be built, see
            ``dgc_convert.nn.compiled``; else the fastest exact sparse
            algorithm for the case, timed once and cached, see
            ``dgc_convert.nn.sparse``), "compiled" (the op, or an error),
            "gather_conv", "gather_bmm", ..., or "masked" (the training
            computation, dense in cost). Training mode always uses the
            training computation.
        interleaved: the head-ownership layout (a property, see Args);
            ``output_order`` / ``blocked_rows``: its relabelling (None when
            blocked; non-persistent buffers derived from it).
        threshold: network gating only, persistent buffer: the score T above
            which a channel is kept. One value for the whole model, held by
            every layer (``dgc_convert.nn.network_gate`` learns it in training
            and writes it to all layers at once). 0 in a new layer.
        norm: the pre-activation ``BatchNorm2d`` (None unless ``preact``).
        gain: the scaled weight standardisation's per-channel gain (None
            unless ``standardization`` has a ``scale``).
    """

    # A registered buffer: ``nn.Module.__getattr__`` returns it, typed there as
    # ``Tensor | Module``; declared here so reads are typed as what it is.
    zeta_t: Tensor
    threshold: Tensor
    output_order: Tensor | None
    blocked_rows: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        *,
        settings: LayerSettings | None = None,
        standardization: WeightStandardization | None = None,
        same_padding: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        settings = LayerSettings.with_options(settings, options)
        heads, squeeze_ratio, zeta = settings.heads, settings.squeeze_ratio, settings.zeta
        gating, preact, squeeze_rule = settings.gating, settings.preact, settings.squeeze_rule
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if out_channels % heads != 0:
            raise ValueError(f"heads={heads} does not divide out_channels={out_channels}")
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int or a pair of ints, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: tuple[int, int] = _pair(kernel_size)
        self.stride: tuple[int, int] = _pair(stride)
        self.padding: tuple[int, int] = _pair(padding)
        self.dilation: tuple[int, int] = _pair(dilation)
        self.heads = heads
        self.squeeze_ratio = squeeze_ratio
        self.zeta = float(zeta)
        self.gating = gating
        self.preact = bool(preact)
        self.squeeze_rule = squeeze_rule
        self.standardization = standardization
        self.same_padding = bool(same_padding)
        self.unit_scores = False
        self._inference_algorithm = "auto"
        self.last_algorithm: str | None = None  # what the last eval-mode forward ran
        # The eval computations and which one serves each case (``nn.inference``).
        self._plan = InferencePlan()

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        has_gain = standardization is not None and standardization.has_gain
        self.gain = nn.Parameter(torch.empty(out_channels, 1, 1, 1)) if has_gain else None
        # The weight eval mode convolves with (standardised, rows in blocked order), and the state it came from.
        self._blocked: tuple[tuple[object, ...], Tensor] | None = None
        # The interleaved layout as one relabelling of output channels (``channel_order``):
        # not persistent (derived from ``interleaved``), moved by ``.to`` with the layer.
        self.register_buffer("output_order", None, persistent=False)
        self.register_buffer("blocked_rows", None, persistent=False)
        self.interleaved = settings.interleaved
        self.norm = nn.BatchNorm2d(in_channels) if self.preact else None
        hidden = saliency_hidden_width(in_channels, squeeze_ratio, squeeze_rule)
        self.saliency_generator = SaliencyGenerator(in_channels, heads, hidden, init=squeeze_rule)
        self.register_buffer("zeta_t", torch.tensor(self.zeta, dtype=torch.float64))
        self._zeta_t_value = self.zeta
        # Only network-gated layers hold the threshold, so head-wise files keep their keys.
        if gating == "network":
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self._threshold_value = 0.0
        # Network gating in training: the last forward's detached scores and
        # output pixels, read by ``network_gate.update_threshold``.
        self.last_gate_record: tuple[Tensor, int] | None = None
        self._last_sparsity: Tensor | None = None
        self.reset_parameters()

    # -- construction -----------------------------------------------------

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        settings: LayerSettings | None = None,
        **options: Any,
    ) -> DGCConv2d:
        """Build a DGC layer with ``conv``'s geometry, weight and bias, and ``settings`` (the
        defaults when None) with any ``LayerSettings`` field given as a keyword on top.

        The new layer lives on ``conv``'s device and dtype; the weight and bias
        are copied, not shared, in the dense layout: which output channels a
        head owns is a fixed relabelling, so the conversion is exact in either
        layout. String padding ('valid', symmetric 'same') becomes its numeric
        equivalent. timm's weight-standardised and TF-'SAME' convolutions
        (``conv_kinds.conv_kind``) keep their weight standardisation (``gain``
        copied) and dynamic padding. With ``preact`` the new ``norm`` starts as
        a fresh ``BatchNorm2d`` (unit weight, zero bias, running mean 0 and
        variance 1). Raises ``ValueError`` for a grouped conv, a padding mode
        other than zeros, an asymmetric 'same', or a forward of its own that
        ``conv_kind`` does not know.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        settings = LayerSettings.with_options(settings, options)
        kind = conv_kind(conv)
        if kind is None:
            raise ValueError(f"{type(conv).__name__} overrides nn.Conv2d.forward in a way a DGC layer cannot reproduce")
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1, got {conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        # A TF-'SAME' conv pads on the fly; its own ``padding`` is not used (0).
        padding = (0, 0) if kind.same_padding else static_padding(conv)
        if padding is None:
            raise ValueError(f"conv.padding={conv.padding!r} pads asymmetrically for kernel {conv.kernel_size}")
        # Built on the meta device: the dense init would be overwritten at once.
        with torch.device("meta"):
            layer = cls(
                conv.in_channels,
                conv.out_channels,
                _as_pair(conv.kernel_size),
                stride=_as_pair(conv.stride),
                padding=padding,
                dilation=_as_pair(conv.dilation),
                bias=conv.bias is not None,
                settings=settings,
                standardization=kind.standardization,
                same_padding=kind.same_padding,
            )
        layer = layer.to_empty(device=conv.weight.device).to(dtype=conv.weight.dtype)
        layer.saliency_generator.reset_parameters()
        if layer.norm is not None:
            layer.norm.reset_parameters()
        if settings.gating == "network":
            layer.set_threshold(0.0)
        layer.set_zeta_t(settings.zeta)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                assert layer.bias is not None  # built with bias=True just above
                layer.bias.copy_(conv.bias)
            if layer.gain is not None:
                gain = conv.get_parameter("gain")
                layer.gain.copy_(gain)
        return layer

    def reset_parameters(self) -> None:
        """Initialise weight and bias as ``nn.Conv2d`` does, and the gates."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.gain is not None:
            nn.init.ones_(self.gain)
        self.saliency_generator.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()

    # -- modes --------------------------------------------------------------

    @property
    def inference_algorithm(self) -> str:
        """How eval mode computes: one of ``INFERENCE_ALGORITHMS`` (checked when set)."""
        return self._inference_algorithm

    @inference_algorithm.setter
    def inference_algorithm(self, value: str) -> None:
        if value not in INFERENCE_ALGORITHMS:
            raise ValueError(f"algorithm must be 'auto' or one of {', '.join(INFERENCE_ALGORITHMS[1:])}; got {value!r}")
        self._inference_algorithm = value
        self._plan.forget_choices()

    # -- head layout --------------------------------------------------------

    @property
    def interleaved(self) -> bool:
        """True for the older interleaved layout (head i owns the dense rows ``i::heads``).

        Such a layer is the blocked layer whose weight and bias rows are taken
        in ``blocked_rows`` order, followed by one gather of its output
        channels in ``output_order`` (``dgc_convert.nn.channel_order``); every
        computation runs blocked. ``weight`` itself always keeps the dense
        layout of the file it came from: output channel o uses ``weight[o]``.
        Setting it re-derives the relabelling; the weight is not touched.
        """
        return self.output_order is not None

    @interleaved.setter
    def interleaved(self, value: bool) -> None:
        device = self.weight.device if "weight" in self._parameters else None
        if value:
            self.output_order = interleaved_output_order(self.out_channels, self.heads, device)
            self.blocked_rows = interleaved_blocked_rows(self.out_channels, self.heads, device)
        else:
            self.output_order = self.blocked_rows = None

    # -- pruning ratio ----------------------------------------------------

    @property
    def settings(self) -> LayerSettings:
        """The layer's DGC settings, as it was built with them (and its current layout)."""
        return LayerSettings(
            heads=self.heads,
            squeeze_ratio=self.squeeze_ratio,
            zeta=self.zeta,
            interleaved=self.interleaved,
            gating=self.gating,
            preact=self.preact,
            squeeze_rule=self.squeeze_rule,
        )

    def set_zeta_t(self, value: float) -> None:
        """Set the pruning ratio forward uses, in [0, 1)."""
        value = _check_zeta("zeta_t", value)
        self.zeta_t.fill_(value)
        self._zeta_t_value = value

    @property
    def zeta_t_value(self) -> float:
        """The current pruning ratio as a Python float (no device sync, unlike reading ``zeta_t``)."""
        return self._zeta_t_value

    @property
    def kept_channels(self) -> int:
        """k: input channels each head keeps per sample at the current ``zeta_t``.

        Under network gating the number varies per sample and head, and the
        threshold only aims at the network's total (MAC-weighted); this is then
        the head-wise target k, which a single layer may keep more or less of.
        """
        return kept_channel_count(self.in_channels, self._zeta_t_value)

    def set_threshold(self, value: float) -> None:
        """Set the network-gating threshold T (network gating only), rounded to
        float32 so every path (float32 scores, the compiled op) compares alike."""
        if self.gating != "network":
            raise ValueError("only a layer with gating='network' has a threshold")
        value = float(torch.tensor(float(value), dtype=torch.float32))
        if math.isnan(value):
            raise ValueError("threshold must be a number, got nan")
        self.threshold.fill_(value)
        self._threshold_value = value

    def kept_channel_macs(self, output_height: int, output_width: int) -> int:
        """MACs per sample one head spends on one kept input channel: ``kh * kw * C'/H * H' * W'``
        (the convolution part of the method's cost formula, ``docs/method.md`` section 4)."""
        return kept_channel_macs(self.kernel_size, self.out_channels, self.heads, output_height, output_width)

    @property
    def threshold_value(self) -> float:
        """The network-gating threshold T as a Python float (0 for head-wise layers)."""
        return self._threshold_value

    @property
    def thresholded(self) -> bool:
        """True when the threshold, not a fixed k, selects: network gating at ``zeta_t > 0``.

        At ``zeta_t = 0`` (warm-up, the identity check) every channel is kept
        whatever the gating.
        """
        return self.gating == "network" and self._zeta_t_value > 0

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DGCConv2d:
        # torch leaves Module._apply unannotated; it returns self.
        module: DGCConv2d = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.output_order is not None:
            # Derived, not data: rebuilt where it now lives (``to_empty`` leaves it unset).
            self.interleaved = True
        # ``model.half()`` / ``.to(bfloat16)`` would round the ratio (0.55 ->
        # 0.5498) and could change k; keep it exact in float64 on the new device.
        if self.zeta_t.dtype != torch.float64:
            self._buffers["zeta_t"] = torch.tensor(self._zeta_t_value, dtype=torch.float64, device=self.zeta_t.device)
        if self.gating == "network" and self.threshold.dtype != torch.float64:
            self._buffers["threshold"] = torch.tensor(
                self._threshold_value, dtype=torch.float64, device=self.threshold.device
            )
        return module

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The buffers were overwritten in place; keep the cached floats in step
        # so forward needs no device sync to read them.
        self._zeta_t_value = _check_zeta("zeta_t", float(self.zeta_t))
        if self.gating == "network":
            value = float(self.threshold)
            if math.isnan(value):
                error_msgs.append(f"{prefix}threshold: the network-gating threshold is NaN")
            else:
                self.set_threshold(value)  # rounded to float32 as every path compares

    # -- what the convolution sees: its weight and its input ---------------

    def conv_weight(self) -> Tensor:
        """The weight the convolution uses: ``weight``, or with ``standardization`` its
        standardised form (recomputed from ``weight`` and ``gain``, differentiable)."""
        if self.standardization is None:
            return self.weight
        return standardize_weight(self.weight, self.standardization, self.gain)

    def blocked_conv_weight(self) -> Tensor:
        """``conv_weight()`` with its rows in blocked order (head h owns rows ``h*C'/H : (h+1)*C'/H``),
        differentiable: ``conv_weight()`` itself, or gathered in ``blocked_rows`` for an interleaved layer."""
        weight = self.conv_weight()
        return weight if self.blocked_rows is None else weight.index_select(0, self.blocked_rows)

    def blocked_bias(self) -> Tensor | None:
        """``bias`` in blocked order (for computations that add it before the output's relabelling)."""
        if self.bias is None or self.blocked_rows is None:
            return self.bias
        return self.bias.index_select(0, self.blocked_rows)

    def blocked_weight(self) -> Tensor:
        """``blocked_conv_weight()`` without gradients for the eval computations, computed again
        only when ``weight``, ``gain`` or the layout changed.

        The result is updated in place (same storage, new version), so the
        caches keyed on it (the sparse algorithms' arrangements, the compiled
        op's packed weight) see every change.
        """
        if self.standardization is None and self.blocked_rows is None:
            return self.weight
        key = (
            tensor_state(self.weight),
            None if self.gain is None else tensor_state(self.gain),
            None if self.blocked_rows is None else tensor_state(self.blocked_rows),
        )
        cached = self._blocked
        if cached is None or cached[0] != key:
            # Not an inference tensor even under inference_mode: those keep no
            # version counter, and the in-place update must be seen.
            with torch.inference_mode(False), torch.no_grad():
                fresh = self.blocked_conv_weight()
                if cached is not None and tensor_state(cached[1])[2:] == tensor_state(fresh)[2:]:
                    fresh = cached[1].copy_(fresh)
            self._blocked = (key, fresh)
            return fresh
        return cached[1]

    def to_output_order(self, out: Tensor) -> Tensor:
        """A blocked-order output (B, C', ...) in the layer's channel order: ``out`` itself,
        or one gather in ``output_order`` for an interleaved layer."""
        if self.output_order is None:
            return out
        return to_output_order(out, self.output_order, keep_layout=not exporting())

    def same_padding_for(self, x: Tensor) -> tuple[int, int, int, int] | None:
        """With ``same_padding``, the TF-'SAME' padding (left, right, top, bottom) in
        pixels the convolution adds to ``x``; None otherwise."""
        if not self.same_padding:
            return None
        return same_padding((x.shape[2], x.shape[3]), self.kernel_size, self.stride, self.dilation)

    def conv_input(self, x: Tensor) -> Tensor:
        """``x`` as the convolution sees it: padded TF-'SAME' with ``same_padding``."""
        pads = self.same_padding_for(x)
        return x if pads is None else pad_input(x, pads)

    @torch.no_grad()
    def fold_weight_standardization(self) -> None:
        """Store the standardised weight as ``weight`` and drop the standardisation
        (and ``gain``): eval computes the same with no work per call. For serving
        (``prepare_for_inference``); training the folded layer further would
        train a plain convolution, no longer a standardised one."""
        if self.standardization is None:
            return
        folded = self.conv_weight()
        self.weight.copy_(folded)
        self.standardization = None
        self.gain = None
        self._blocked = None

    # -- the method -------------------------------------------------------

    def preactivate(self, x: Tensor) -> Tensor:
        """``relu(norm(x))`` with ``preact``, else ``x``: what the gates and the convolution see."""
        if self.norm is None:
            return x
        return torch.relu(self.norm(x))

    def gate_scores(self, x: Tensor) -> Tensor:
        """Scores (batch, heads, in_channels) for the already pre-activated ``x`` (all 1 with ``unit_scores``)."""
        if self.unit_scores:
            return x.new_ones(x.shape[0], self.heads, self.in_channels)
        scores: Tensor = self.saliency_generator(x)  # Module.__call__ is typed as returning Any
        return scores

    def saliency(self, x: Tensor) -> Tensor:
        """Per-head, per-sample channel scores ``g`` for the layer's input ``x``
        (pre-activated first with ``preact``): shape (batch, heads, in_channels), >= 0.

        With ``preact`` in training mode this runs the layer's ``norm`` again,
        which updates its running statistics: call it in eval mode to look.
        """
        return self.gate_scores(self.preactivate(x))

    def _keys(self, scores: Tensor) -> Tensor:
        """Selection keys (float64, same shape as ``scores``): larger is kept first.

        The score scaled by ``1 - c * 2**-40``, which orders equal scores by
        channel c and never reorders distinct float32/bf16 ones (they differ by
        at least 2**-24 relatively); a zero score (scores are >= 0) gets the
        key ``-c``, below every positive score, so equal zeros are ordered by
        channel too (a scale cannot order them: it keeps them 0).
        """
        channel = torch.arange(scores.shape[2], device=scores.device, dtype=torch.float64)
        detached = scores.detach().double()
        return torch.where(detached > 0, detached * (1.0 - channel * 2.0**-40), -channel)

    def _threshold_mask(self, scores: Tensor, keys: Tensor) -> Tensor:
        """Network gating: scores above T, and each head's top channel (ties to the lower index)."""
        # T is float32-representable (``set_threshold``), so comparing in at
        # least float32 agrees with the compiled op's float comparison; bf16/fp16
        # scores (autocast) are widened rather than T rounded to their precision.
        dtype = torch.promote_types(scores.dtype, torch.float32)
        above = scores.detach().to(dtype) > self.threshold.to(dtype)
        return above.scatter(2, keys.argmax(dim=2, keepdim=True), True)

    def select(self, scores: Tensor) -> Tensor:
        """Indices (batch, heads, k) of the channels each head keeps (uses the detached scores).

        Head-wise: exactly ``k``, and the same set in training, every inference
        algorithm and ONNX: equal scores, zero included, go to the lower
        channel index (ONNX TopK's rule; ``torch.topk`` leaves ties
        unspecified), see ``_keys``. Network gating (``thresholded``): every
        channel scoring above T, at least the top one; heads that keep fewer
        than the widest head are padded with channels they drop (their rank
        below every kept one), which ``kept_scores`` gives score 0, and the
        width is rounded up to a multiple of C/16 so the inference algorithms
        meet few distinct shapes.
        """
        return self.kept(scores)[0]

    def kept(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``select``'s indices and ``kept_scores``' scores, the keys and the mask computed once."""
        keys = self._keys(scores)
        if not self.thresholded:
            index = keys.topk(self.kept_channels, dim=2, sorted=False).indices
            return index, scores.gather(2, index)
        mask = self._threshold_mask(scores, keys)
        widest = int(mask.sum(dim=2).max())
        step = max(1, self.in_channels // 16)
        width = min(self.in_channels, -(-widest // step) * step)
        # Kept channels rank first, then the padding. By key alone a dropped
        # channel could outrank a kept one: in a float64 model, scores within
        # about C * 2**-40 of each other are ordered by channel (section 1).
        index = keys.masked_fill(~mask, -math.inf).topk(width, dim=2, sorted=False).indices
        return index, scores.gather(2, index) * mask.gather(2, index)

    def kept_scores(self, scores: Tensor, index: Tensor) -> Tensor:
        """The scores of the channels ``select`` returned, 0 for network gating's padding."""
        kept = scores.gather(2, index)
        if self.thresholded:
            kept = kept * self._threshold_mask(scores, self._keys(scores)).gather(2, index)
        return kept

    def selection_mask(self, scores: Tensor) -> Tensor:
        """Boolean mask (batch, heads, in_channels): the channels each head keeps."""
        if self.thresholded:
            return self._threshold_mask(scores, self._keys(scores))
        if self.kept_channels >= self.in_channels:
            return torch.ones_like(scores, dtype=torch.bool)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(2, self.select(scores), True)

    def gates(self, x: Tensor) -> Gates:
        """Scores and kept-channel mask for the layer's input ``x``."""
        scores = self.saliency(x)
        return Gates(scores, self.selection_mask(scores))

    @property
    def sparsity_loss(self) -> Tensor | None:
        """Sparsity term of the last forward: per head the mean score over batch
        and channels (before gating), summed over heads. None before any forward."""
        return self._last_sparsity

    def forward(self, x: Tensor) -> Tensor:
        """Same shapes as ``nn.Conv2d``: (B, C, H, W) or unbatched (C, H, W) in, (B, C', H', W') or
        (C', H', W') out; an empty batch gives an empty output."""
        if isinstance(x, torch.fx.Proxy):
            # torch.fx tracing: the layer is one call in the graph (a leaf), which runs
            # this forward for real when the traced module runs.
            traced: Tensor = x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
            return traced
        if jit_tracing():  # shapes are traced values there: no Python checks on them
            return self._forward(x)
        if x.dim() == 3:  # unbatched, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            # nn.Conv2d's own message, rather than a shape error from deep inside the gates.
            raise RuntimeError(
                f"Given groups=1, weight of size {list(self.weight.shape)}, expected input{list(x.shape)} to have "
                f"{self.in_channels} channels, but got {x.shape[1] if x.dim() > 1 else 0} channels instead"
            )
        if x.shape[0] == 0:
            return self._empty_forward(x)
        return self._forward(x)

    def _empty_forward(self, x: Tensor) -> Tensor:
        """A batch of none: the dense convolution's empty output (nothing to gate, no
        batch statistics to take: the pre-activation, which keeps channels, is skipped)."""
        self._last_sparsity = x.new_zeros(())
        conv_input = self.conv_input(x)
        return torch.nn.functional.conv2d(
            conv_input, self.conv_weight(), self.bias, self.stride, self.padding, self.dilation
        )

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's sparsity term and gate record belong to that forward's graph:
        # a copy (deepcopy for an EMA or a "best" model, pickling) starts without them.
        # The eval computations and their weight arrangements are rebuilt on demand, not copied.
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["_last_sparsity"] = None
        state["last_gate_record"] = None
        state["_plan"] = InferencePlan()
        state["_blocked"] = None
        return state

    def _forward(self, x: Tensor) -> Tensor:
        """The one dispatch: training computation in training mode, else the eval computation
        chosen for this case (``nn.inference``); the layout's relabelling last, whichever ran."""
        x = self.preactivate(x)
        out = self.masked_forward(x) if self.training else self._plan.for_input(self, x)(self, x)
        return self.to_output_order(out)

    def masked_forward(self, x: Tensor) -> Tensor:
        """The training computation on the pre-activated ``x`` (blocked order, bias included):
        every channel, the dropped ones gated to zero, with ``functional``'s lean backward.
        Also eval's ``inference_algorithm = "masked"``."""
        scores = self.gate_scores(x)
        mask = self.selection_mask(scores)
        self.note_sparsity(scores)
        gate = scores * mask if self.kept_channels < self.in_channels or self.thresholded else scores
        out = gated_conv2d(
            self.conv_input(x), gate, self.blocked_conv_weight(), self.stride, self.padding, self.dilation
        )
        if self.training and self.gating == "network":
            self.last_gate_record = (scores.detach(), out.shape[2] * out.shape[3])
        bias = self.blocked_bias()
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def note_sparsity(self, scores: Tensor) -> None:
        """Record this forward's sparsity term (``sparsity_loss``) from its ``scores``."""
        self._last_sparsity = scores.mean(dim=(0, 2)).sum()

    def dense_gate(self, scores: Tensor) -> Tensor:
        """The gate (batch, heads, in_channels): each kept channel's score, 0 for the others,
        in graph-friendly operations (TopK + ScatterElements head-wise; a comparison with T,
        and ArgMax for each head's top channel, under network gating)."""
        if self.thresholded:
            return torch.where(self._threshold_mask(scores, self._keys(scores)), scores, torch.zeros_like(scores))
        index = self.select(scores)
        return torch.zeros_like(scores).scatter(2, index, scores.gather(2, index))

    def compiled_weight(self) -> Tensor:
        """The compiled op's prepacked weight (heads, C, kh, kw, C'/heads), packed
        once and again whenever the weight or the layout changes."""
        kh, kw = self.kernel_size
        flat = self._plan.compiled_op.packed_weight(self)
        return flat.view(self.heads, self.in_channels, kh, kw, self.out_channels // self.heads)

    def prepare_weights(self) -> None:
        """Arrange the weight for eval now rather than at the first eval forward
        (it is arranged again whenever it changes): packed for the compiled op
        where it runs, else arranged for the sparse algorithms."""
        self._plan.for_preparation(self).prepare(self)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        text += (
            f", heads={self.heads}, squeeze_ratio={self.squeeze_ratio}, zeta={self.zeta}, zeta_t={self._zeta_t_value:g}"
        )
        if self.interleaved:
            text += ", interleaved=True"
        if self.gating != DEFAULT_GATING:
            text += f", gating={self.gating!r}, threshold={self._threshold_value:.4g}"
        if self.preact:
            text += ", preact=True"
        if self.squeeze_rule != DEFAULT_SQUEEZE_RULE:
            text += f", squeeze_rule={self.squeeze_rule!r}"
        if self.standardization is not None:
            text += f", standardization={self.standardization}"
        if self.same_padding:
            text += ", same_padding=True"
        return text
