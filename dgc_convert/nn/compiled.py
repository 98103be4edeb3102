"""A compiled CPU inference op for one DGC layer (``dgc_convert::dgc_conv2d``).

One call per layer and batch computes the saliency scores, selects exactly the
channels ``DGCConv2d.select`` selects (ties to the lower channel), convolves
only the kept channels with a vectorised direct convolution on channels-last
data and writes a channels-last output in head-major (blocked) channel order.
The source is ``csrc/dgc_conv.cpp``; it is built on first use with
``torch.utils.cpp_extension.load`` (ninja, ``-O3 -march=native``) into torch's
extension cache, under a name that carries the CPU's vector level and a hash
of the compiler's target (so a cache shared between machines never loads code
built for another CPU) and of the torch version.

``available()`` builds and loads once. Without a compiler or ninja, when the
build fails, or with ``DGC_CONVERT_NO_COMPILE=1`` it returns False and warns
once; nothing here raises for that reason.

The op is for inference: float32, CPU, no autograd.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "available",
    "in_use",
    "paused",
    "is_paused",
    "unavailable_reason",
    "vector_level",
    "pack_weight",
    "dgc_conv2d",
    "packed_weight_for",
    "dgc_conv2d_for_layer",
    "blocked_dgc_conv2d_for_layer",
]

_SOURCE = Path(__file__).with_name("csrc") / "dgc_conv.cpp"
_DISABLE_ENV = "DGC_CONVERT_NO_COMPILE"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]

_lock = threading.Lock()
_state: bool | None = None
_reason: str | None = None
_level: str | None = None


def _compiler() -> str:
    # What torch.utils.cpp_extension compiles with.
    return os.environ.get("CXX", "c++")


def _target_macros(cxx: str) -> str:
    """The compiler's predefined macros for ``-march=native``: they name every
    instruction-set extension the build may use."""
    result = subprocess.run(
        [cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return "\n".join(sorted(result.stdout.splitlines()))


def _level_of(macros: str) -> str:
    if "#define __AVX512F__ 1" in macros:
        return "avx512"
    if "#define __AVX2__ 1" in macros:
        return "avx2"
    return "generic"


def _one_line(error: BaseException) -> str:
    """The gist of an error on one line: its first line, or the first compiler error in it."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines[1:] if "error" in line.lower()]
    line = lines[0] if not errors else f"{lines[0].split(':')[0]}: {errors[0]}"
    return line if len(line) <= 300 else line[:297] + "..."


def _build() -> None:
    """Build (or find in the cache) and load the extension; register the fake. Raises on failure."""
    global _level
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import logs a CUDA_HOME notice on machines without CUDA
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise RuntimeError("ninja is not available") from error
    macros = _target_macros(cxx)
    _level = _level_of(macros)
    key = hashlib.sha256("\n".join([macros, torch.__version__, *_FLAGS]).encode()).hexdigest()[:10]
    name = f"dgc_convert_cpu_{_level}_{key}"
    cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()


def _out_size(size: Any, kernel: int, stride: int, padding: int, dilation: int) -> Any:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _register_fakes() -> None:
    @torch.library.register_fake("dgc_convert::dgc_conv2d")  # type: ignore[untyped-decorator]
    def _dgc_conv2d_fake(
        x: Tensor,
        reduce: Tensor,
        expand: Tensor,
        beta: Tensor,
        packed_weight: Tensor,
        bias: Tensor | None,
        kept: int,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        unit_scores: bool,
        threshold: float | None = None,
    ) -> Tensor:
        batch, _, height, width = x.shape
        heads, _, kh, kw, per_head = packed_weight.shape
        out_h = _out_size(height, kh, stride[0], padding[0], dilation[0])
        out_w = _out_size(width, kw, stride[1], padding[1], dilation[1])
        return torch.empty(
            (batch, heads * per_head, out_h, out_w),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )


def available() -> bool:
    """True when the compiled op is built and loaded (built on the first call).

    False, with one warning naming the reason, when the build is disabled
    (``DGC_CONVERT_NO_COMPILE=1``), there is no compiler or ninja, or the build
    fails. Never raises for those reasons.
    """
    global _state, _reason
    if _state is None:
        with _lock:
            if _state is None:
                if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
                    _reason = f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
                else:
                    try:
                        _build()
                    except Exception as error:
                        _reason = _one_line(error)
                if _reason is not None:
                    warnings.warn(
                        f"dgc_convert: compiled DGC op unavailable ({_reason}); using the PyTorch path",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _state = _reason is None
    return _state


_paused = threading.local()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Inside the block (this thread only), DGC layers do not use the op: their
    ``auto`` algorithm times the PyTorch sparse algorithms instead. For
    comparing the two paths, and for testing the one without the other."""
    before = getattr(_paused, "value", False)
    _paused.value = True
    try:
        yield
    finally:
        _paused.value = before


def is_paused() -> bool:
    """Whether this thread is inside ``paused()`` (never builds the op, unlike ``in_use``)."""
    return bool(getattr(_paused, "value", False))


def in_use() -> bool:
    """Whether DGC layers use the op now: it is available and not ``paused()``."""
    return not getattr(_paused, "value", False) and available()


def unavailable_reason() -> str | None:
    """Why ``available()`` returned False (None when it is available or not yet asked)."""
    return _reason


def vector_level() -> str | None:
    """The vector level the loaded build uses: "avx512", "avx2" or "generic" (None before a build)."""
    return _level


def _require() -> None:
    if not available():
        raise RuntimeError(f"the compiled DGC op is unavailable: {_reason}")


def pack_weight(weight: Tensor, heads: int) -> Tensor:
    """The one-time prepacked weight: (C', C, kh, kw) -> (heads, C, kh, kw, C'/heads), float32.

    Entry [h, c, ky, kx, j] is head h's j-th filter over input channel c,
    ``weight[h*(C'/heads) + j]`` (the blocked layout).
    """
    if _state is not True:
        _require()
    out: Tensor = torch.ops.dgc_convert.dgc_pack_weight.default(weight.detach(), heads)
    return out


def dgc_conv2d(
    x: Tensor,
    reduce: Tensor,
    expand: Tensor,
    beta: Tensor,
    packed_weight: Tensor,
    bias: Tensor | None,
    kept: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    unit_scores: bool = False,
    threshold: float | None = None,
) -> Tensor:
    """One blocked DGC layer's eval forward: (B, C, H, W) -> (B, C', H', W'), channels-last, float32.

    ``reduce`` (heads, hidden, C), ``expand`` (heads, C, hidden) and ``beta``
    (heads, C) are the saliency generator's parameters (unused when
    ``unit_scores``: every score is then 1); ``packed_weight`` comes from
    ``pack_weight``; ``kept`` is k; ``bias`` is in the same head-major order as the output. With a
    ``threshold`` (network gating) each (sample, head) keeps every channel
    scoring above it, at least its top one, and ``kept`` is not used (the
    scratch space is sized for all C channels).
    """
    if _state is not True:
        _require()
    out: Tensor = torch.ops.dgc_convert.dgc_conv2d.default(
        x,
        reduce,
        expand,
        beta,
        packed_weight,
        bias,
        kept,
        stride,
        padding,
        dilation,
        unit_scores,
        threshold,
    )
    return out


def packed_weight_for(layer: Any) -> Tensor:
    """``layer``'s prepacked weight (a ``DGCConv2d`` keeps it, repacked whenever the weight changes)."""
    packed: Tensor = layer.compiled_weight()
    return packed


def dgc_conv2d_for_layer(
    layer: Any, x: Tensor, packed: Tensor | None = None, *, padding: Sequence[int] | None = None
) -> Tensor:
    """``layer``'s eval forward (a ``DGCConv2d``) through the compiled op; channels-last output.

    ``x`` is the layer's input after its pre-activation, if any, and before
    any TF-'SAME' padding (the op pools ``x`` and pads it by ``padding``).
    ``packed``: the layer's prepacked weight (``pack_weight`` of its weight
    rows in blocked order); taken from ``packed_weight_for(layer)`` when None.
    ``padding``: (height, width) zeros on each side, the layer's own when None
    (a TF-'SAME' layer passes what it needs at this input size). The output
    is in the layer's channel order (an interleaved layer's relabelling
    applied). Equal to the layer's other inference paths up to float rounding.
    """
    if packed is None:
        packed = packed_weight_for(layer)
    out = blocked_dgc_conv2d_for_layer(layer, x, packed, layer.padding if padding is None else padding)
    result: Tensor = layer.to_output_order(out)
    return result


def blocked_dgc_conv2d_for_layer(layer: Any, x: Tensor, packed: Tensor, padding: Sequence[int]) -> Tensor:
    """The op called with ``layer``'s generator, bias, k (or threshold) and geometry: the output in
    blocked channel order (an interleaved layer relabels it afterwards), channels-last.

    ``packed`` is the layer's prepacked weight, (heads, C, kh, kw, C'/heads); ``padding`` the
    (height, width) zeros on each side.
    """
    generator = layer.saliency_generator
    thresholded = bool(layer.thresholded)
    bias = layer.blocked_bias()
    return dgc_conv2d(
        x,
        generator.reduce.detach(),
        generator.expand.detach(),
        generator.beta.detach(),
        packed,
        None if bias is None else bias.detach(),
        layer.in_channels if thresholded else layer.kept_channels,
        layer.stride,
        padding,
        layer.dilation,
        bool(layer.unit_scores),
        layer.threshold_value if thresholded else None,
    )
