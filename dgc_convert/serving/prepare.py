"""Get a model ready to serve: BatchNorm folded into the convolution before it, DGC weights
arranged for gathering, eval mode, the faster memory layout, dense weights packed once, and
optionally ``torch.compile`` with inductor freezing. Why folding holds for DGC layers, what each
engine does, and the torch-version workarounds behind them (``PackedConv2d``, freezing patched in
per call): ``docs/serving.md``, "Preparing a model to serve".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dgc_convert.conversion.tracing import trace, trace_error
from dgc_convert.nn.conv_kinds import conv_kind, standardize_weight
from dgc_convert.nn.layer import DGCConv2d

__all__ = ["ENGINES", "InferenceReport", "PackedConv2d", "prepare_for_inference", "fold_batchnorm"]

Engine = Literal["eager", "compile"]
ENGINES: tuple[str, ...] = ("eager", "compile")


@dataclass
class InferenceReport:
    """What ``prepare_for_inference`` did: folded (conv, batchnorm) pairs, and why not more."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    standardized: int = 0  # weight-standardised convolutions (dense and DGC) whose standardised weight was stored
    not_folded: list[tuple[str, str]] = field(default_factory=list)  # (batchnorm name, reason)
    dgc_layers: int = 0
    trace_error: str | None = None
    engine: str = "eager"
    channels_last: bool = False
    packed: int = 0  # plain convolutions whose weights were packed once (eager engine)
    compile_seconds: float | None = None  # the first (compiling) call, when ``example_input`` was given
    dgc_in_graph: str | None = None  # compile engine: "custom op" or "eager (one graph break per layer)"
    notes: list[str] = field(default_factory=list)
    model: Callable[..., Any] | None = field(default=None, repr=False)  # what to serve


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d | DGCConv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode ``bn`` that directly follows ``conv`` into its weight and bias, in place.

    ``conv`` must use its weight as it is: a weight-standardised one would
    standardise the folded scale away (``fold_weight_standardization`` first).
    """
    if not _uses_weight_as_is(conv):
        raise ValueError(f"{type(conv).__name__} computes its weight on the fly: fold its standardisation first")
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


def _uses_weight_as_is(conv: nn.Module) -> bool:
    """A convolution (dense or DGC) that convolves with ``weight`` itself, not a
    standardised form of it (its padding may still be TF-'SAME')."""
    if isinstance(conv, DGCConv2d):
        return conv.standardization is None
    kind = conv_kind(conv) if isinstance(conv, nn.Conv2d) else None
    return kind is not None and kind.standardization is None


@torch.no_grad()
def _plain_twin(conv: nn.Conv2d) -> nn.Conv2d:
    """A convolution computing what the weight-standardised ``conv`` computes in eval, with
    the standardised weight stored: ``nn.Conv2d``, or timm's ``Conv2dSame`` for TF-'SAME'."""
    kind = conv_kind(conv)
    assert kind is not None and kind.standardization is not None  # what the caller selected
    gain = conv.get_parameter("gain") if kind.standardization.has_gain else None
    # No device/dtype keywords: older timm releases' Conv2dSame takes none; moved below.
    options: dict[str, Any] = {
        "stride": conv.stride,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    kernel = (conv.kernel_size[0], conv.kernel_size[1])
    padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], conv.padding[1])
    twin: nn.Conv2d
    if kind.same_padding:
        from timm.layers.conv2d_same import Conv2dSame  # the conv is timm's: timm is imported

        twin = Conv2dSame(conv.in_channels, conv.out_channels, kernel, padding=0, **options)
    else:
        twin = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, padding=padding, **options)
    twin.to(device=conv.weight.device, dtype=conv.weight.dtype)
    twin.weight.copy_(standardize_weight(conv.weight, kind.standardization, gain))
    if conv.bias is not None and twin.bias is not None:
        twin.bias.copy_(conv.bias)
    twin.train(conv.training)
    return twin


def _fold_weight_standardization(model: nn.Module, report: InferenceReport) -> None:
    """Store every weight-standardised convolution's standardised weight (eval's
    weights are fixed): DGC layers drop their standardisation, timm's
    ``StdConv2d`` family becomes plain convolutions. What is served then does
    no per-call weight work, and BatchNorm folds into these layers too."""
    twins: dict[int, nn.Module] = {}  # a convolution shared under several names stays shared
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, DGCConv2d):
            if module.standardization is not None:
                module.fold_weight_standardization()
                report.standardized += 1
            continue
        if not name or not isinstance(module, nn.Conv2d) or _uses_weight_as_is(module):
            continue
        kind = conv_kind(module)
        if kind is None or kind.standardization is None:
            continue
        if id(module) not in twins:
            twins[id(module)] = _plain_twin(module)
            report.standardized += 1
        parent, child = _parent_and_name(model, name)
        setattr(parent, child, twins[id(module)])


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
        if not isinstance(conv, (nn.Conv2d, DGCConv2d)) or not _uses_weight_as_is(conv):
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


class PackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is reordered for oneDNN once, not on every call.

    Same parameters and state dict as the convolution it replaces; the packed
    copy is rebuilt when the weight changes (it follows the weight's version)
    and is not pickled or deep-copied (rebuilt on the next call). Calls that
    the packed kernel does not cover (gradients wanted, not float32 on CPU)
    run the ordinary convolution. Outputs are channels-last.
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple[object, ...] = ()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PackedConv2d:
        """The packed twin of ``conv``, sharing its parameters."""
        packed = cls.__new__(cls)
        packed.__dict__.update(conv.__dict__)
        packed._parameters = dict(conv._parameters)
        packed._buffers = dict(conv._buffers)
        packed._modules = dict(conv._modules)
        packed.pack()
        return packed

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """A plain float32 CPU ``nn.Conv2d`` with numeric zero padding, and oneDNN present."""
        return (
            type(conv) is nn.Conv2d
            and torch.backends.mkldnn.is_available()
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu"
        )

    def _key(self) -> tuple[object, ...]:
        weight = self.weight
        version = None if weight.is_inference() else weight._version
        return (weight.data_ptr(), version, weight.shape)

    @torch.no_grad()
    def pack(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout (rebuilt when the weight changed)."""
        key = self._key()
        if self._packed is None or key != self._packed_key:
            weight = self.weight.detach().contiguous(memory_format=torch.channels_last)
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or self.weight.dtype != torch.float32
            or self.weight.device.type != "cpu"
            or x.dim() != 4
        ):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        bias = None if self.bias is None else self.bias.detach()
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise(
            x,
            self.pack(),
            bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "none",
            [],
            "",
        )
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # an opaque oneDNN tensor: neither picklable nor copyable
        state.pop("_packed_key", None)
        return state


def _pack_convolutions(model: nn.Module, report: InferenceReport) -> None:
    for name, module in list(model.named_modules()):
        if not name or not PackedConv2d.supports(module):
            continue
        assert isinstance(module, nn.Conv2d)  # as supports() checked
        try:
            packed = PackedConv2d.from_conv(module)
        except RuntimeError as error:  # oneDNN refused this shape: keep the plain convolution
            report.notes.append(f"{name}: not packed ({str(error).splitlines()[0]})")
            continue
        parent, child = _parent_and_name(model, name)
        setattr(parent, child, packed)
        report.packed += 1


def dgc_custom_op_available() -> bool:
    """Whether ``torch.ops.dgc_convert.dgc_conv2d`` (one opaque call per DGC layer) is registered."""
    from dgc_convert.nn import compiled

    return compiled.available()


_EAGER_DGC_CLASS: type[DGCConv2d] | None = None


def _eager_dgc_class() -> type[DGCConv2d]:
    """``DGCConv2d`` whose forward ``torch.compile`` leaves out of its graphs (built on first use: importing dynamo is slow)."""
    global _EAGER_DGC_CLASS
    if _EAGER_DGC_CLASS is None:
        _EAGER_DGC_CLASS = type(
            "EagerDGCConv2d",
            (DGCConv2d,),
            {"forward": torch.compiler.disable(DGCConv2d.forward), "__module__": __name__},
        )
    return _EAGER_DGC_CLASS


def _compile(model: nn.Module, report: InferenceReport, example_input: torch.Tensor | None) -> Callable[..., Any]:
    if dgc_custom_op_available():
        report.dgc_in_graph = "custom op"
    else:
        report.dgc_in_graph = "eager (one graph break per layer)"
        eager_class = _eager_dgc_class()
        for module in model.modules():
            if type(module) is DGCConv2d:
                # The Python sparse path (algorithm timing, weight caches,
                # per-sample loops) neither traces well nor gains from it.
                module.__class__ = eager_class
    # Each graph break leaves a frame (a residual block's forward) that dynamo
    # compiles once per distinct shape; past its recompile limit (8) it would
    # silently run the rest eagerly. Raised, never lowered, process-wide.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = FrozenModel(torch.compile(model, backend="inductor"))
    if example_input is not None:
        start = time.perf_counter()
        with torch.no_grad():
            compiled(example_input)
        report.compile_seconds = time.perf_counter() - start
    return compiled


class FrozenModel:
    """A ``torch.compile``d model whose every call (and so every compile or
    recompile) runs with inductor ``freezing`` on.

    ``torch.compile(..., options={"freezing": True})`` does not freeze on
    torch 2.14 (measured: ResNet-50, batch 1, one thread, 72 ms against 37 ms
    with the config set while compiling), and compiling happens lazily at the
    first call of each shape, so the setting has to be in force at every call;
    patching it per call costs microseconds and changes nothing global.
    """

    def __init__(self, compiled: Callable[..., Any]) -> None:
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def prepare_for_inference(
    model: nn.Module,
    engine: Engine = "eager",
    *,
    channels_last: bool = True,
    pack: bool = True,
    example_input: torch.Tensor | None = None,
) -> InferenceReport:
    """Prepare ``model`` for serving, in place, and return what to serve in ``report.model``.

    Always: eval mode, weight standardisation (timm's ``StdConv2d`` family,
    dense and DGC) stored as the standardised weight, BatchNorm folded into
    the convolutions (dense and DGC) they follow, DGC weights pre-arranged for the sparse inference path, and
    (``channels_last``) parameters in channels-last memory format, which
    oneDNN's convolutions run faster on: feed channels-last inputs. With
    ``engine="eager"`` and ``pack``, plain convolutions become
    ``PackedConv2d`` (weights reordered for oneDNN once); ``report.model`` is
    ``model``. With ``engine="compile"``, ``report.model`` is
    ``torch.compile(model)`` with inductor freezing; its first call (under
    ``torch.no_grad()``) compiles, or ``example_input`` makes the call here
    and ``report.compile_seconds`` says how long it took (on 2 AMD EPYC
    cores, torch 2.14: resnet18 at 224 about 3 s, resnet50 about 5-18 s,
    depending on inductor's on-disk cache). See the module docstring.

    Outputs equal the unprepared model's in eval mode (up to float rounding).
    Train again only after rebuilding the model.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    model.eval()
    report = InferenceReport(engine=engine, channels_last=channels_last)
    _fold_weight_standardization(model, report)  # first: BatchNorm then folds into these layers too
    for conv_name, bn_name in _foldable_pairs(model, report):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, (nn.Conv2d, DGCConv2d)) and isinstance(
            bn, nn.BatchNorm2d
        )  # as _foldable_pairs found them
        fold_batchnorm(conv, bn)
        parent, child = _parent_and_name(model, bn_name)
        setattr(parent, child, nn.Identity())
        report.folded.append((conv_name, bn_name))
    if channels_last:  # before arranging DGC weights: the conversion makes new tensors
        model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, DGCConv2d):
            module.prepare_weights()
            report.dgc_layers += 1
    model.dgc_prepared_for_inference = True  # type: ignore[assignment]  # ``save`` refuses: folded BatchNorms cannot be rebuilt by name
    if example_input is not None and channels_last:
        example_input = example_input.contiguous(memory_format=torch.channels_last)
    if engine == "eager":
        if pack:
            _pack_convolutions(model, report)
        report.model = model
    else:
        report.model = _compile(model, report, example_input)
    return report
