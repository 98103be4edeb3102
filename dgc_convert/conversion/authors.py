"""Import the authors' released DGC checkpoints (Su et al., ECCV 2020, github.com/hellozhuo/dgc).

Their ResNets are torchvision's BasicBlock ResNets with DGC blocks; ``import_authors_checkpoint``
converts exactly those layers (interleaved, pre-activation, the authors' squeeze rule) and maps
every tensor by name and checked shape, reading the file with ``torch.load(weights_only=True)``
only. The mapping table and how their selection rule differs from ours: ``docs/files.md``,
"The authors' checkpoints".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dgc_convert.conversion.dense_weights import read_torch_state_dict
from dgc_convert.conversion.settings import ConvertSection, build_section
from dgc_convert.conversion.surgery import LayerSettings, apply_conversion
from dgc_convert.conversion.zoo import create_model
from dgc_convert.errors import LoadError, SettingsError, first_line
from dgc_convert.nn.channel_order import interleave_head_major
from dgc_convert.nn.layer import DGCConv2d, kept_channel_count

__all__ = [
    "AUTHORS_MODELS",
    "AuthorsImport",
    "ImportedLayer",
    "read_authors_state_dict",
    "authors_dgc_layers",
    "import_authors_checkpoint",
]

# The authors' dynamic ResNets are torchvision's BasicBlock ResNets.
AUTHORS_MODELS: tuple[str, ...] = ("resnet18", "resnet34")
# Names listed in an error before "... (N in all)".
_SHOWN = 3


@dataclass(frozen=True)
class ImportedLayer:
    """One DGC layer as imported: its geometry, the checkpoint's dropped-channel
    count ``inactive`` (n), the ratio ``zeta_t = n / C`` and ``kept = C - n``."""

    name: str
    in_channels: int
    out_channels: int
    heads: int
    hidden: int
    inactive: int
    zeta_t: float
    kept: int


@dataclass
class AuthorsImport:
    """What ``import_authors_checkpoint`` did: the source file, the model built,
    the settings used, every DGC layer, the checkpoint tensors read and the
    parameter count of the imported model. ``off_target`` names the layers
    whose saved dropped-channel count is not ``round(zeta * C)`` for the
    ``zeta`` given (a checkpoint saved before the end of its ramp, or a
    different pruning ratio)."""

    source: str
    model: str
    num_classes: int
    heads: int
    squeeze_ratio: float
    zeta: float
    layers: list[ImportedLayer] = field(default_factory=list)
    tensors: int = 0
    parameters: int = 0

    @property
    def off_target(self) -> list[str]:
        """Layers whose saved pruning state is not ``round(zeta * C)`` channels (they evaluate at their own)."""
        return [layer.name for layer in self.layers if layer.inactive != round(self.zeta * layer.in_channels)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {**asdict(self), "off_target": self.off_target}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def read_authors_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The weights of a checkpoint file as a flat name -> tensor dict.

    Read with ``torch.load(map_location="cpu", weights_only=True)`` and nothing
    else (``dense_weights.read_torch_state_dict``, whatever the suffix). The
    weights may sit under a top-level key (``dense_weights.WRAPPER_KEYS``; the
    authors' training script uses ``state_dict``); ``module.`` prefixes
    (DataParallel) are stripped.

    Raises:
        LoadError: a missing or unreadable file, one that needs more than
            weights-only unpickling, or one without a dict of tensors.
    """
    return read_torch_state_dict(path)[0]


def authors_dgc_layers(model: nn.Module) -> list[str]:
    """Names of the convolutions the authors made DGC layers in a torchvision
    BasicBlock ResNet: every block's ``conv1``, ``conv2`` and ``downsample.0``."""
    from torchvision.models.resnet import BasicBlock

    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, BasicBlock):
            names += [f"{name}.conv1", f"{name}.conv2"]
            if module.downsample is not None:
                names.append(f"{name}.downsample.0")
    return names


def _heads_in_file(state: Mapping[str, Tensor], layer: str) -> int:
    """1 + the largest ``headconv_{i}`` index under ``layer`` (0 when there is none)."""
    pattern = re.compile(re.escape(layer) + r"\.headconv_(\d+)\.")
    indices = [int(m.group(1)) for key in state if (m := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _check_settings(model: str, heads: int | None, zeta: float, squeeze_ratio: float) -> None:
    if model not in AUTHORS_MODELS:
        raise SettingsError(
            f"model {model!r} is not one the authors' DGC code builds; import-authors supports {', '.join(AUTHORS_MODELS)}"
        )
    # The schema's bounds and messages (heads, zeta, squeeze ratio), as for any conversion.
    build_section(ConvertSection, {"heads": heads, "zeta": zeta, "squeeze_ratio": squeeze_ratio}, error=SettingsError)
    if squeeze_ratio != int(squeeze_ratio):
        raise SettingsError(f"squeeze_ratio must be a whole number for the authors' rule, got {squeeze_ratio!r}")


class _Mapper:
    """Collects our tensors from the checkpoint's, remembering what was read,
    what was missing and which shapes differ."""

    def __init__(self, file: Path, state: Mapping[str, Tensor]) -> None:
        self.file = file
        self.state = state
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []
        self.mapped: dict[str, Tensor] = {}

    def fetch(self, key: str, shape: tuple[int, ...], hint: str = "") -> Tensor | None:
        """Their tensor ``key``, checked to have ``shape``; None when absent or misshapen."""
        tensor = self.state.get(key)
        if tensor is None:
            self.missing.append(key)
            return None
        self.used.add(key)
        if tuple(tensor.shape) != shape:
            self.bad_shapes.append(f"{key} has shape {tuple(tensor.shape)}, the model needs {shape}{hint}")
            return None
        return tensor

    def stacked(self, keys: list[str], shape: tuple[int, ...], hint: str = "") -> Tensor | None:
        """``torch.stack`` of their tensors ``keys`` (each of ``shape``), or None if any is unusable."""
        tensors = [self.fetch(key, shape, hint) for key in keys]
        present = [t for t in tensors if t is not None]
        return torch.stack(present) if len(present) == len(keys) else None

    def put(self, ours: str, tensor: Tensor | None) -> None:
        if tensor is not None:
            self.mapped[ours] = tensor

    def dgc_layer(self, name: str, layer: DGCConv2d, squeeze_ratio: float) -> ImportedLayer | None:
        heads, c_in, c_out = layer.heads, layer.in_channels, layer.out_channels
        hidden = layer.saliency_generator.hidden
        kh, kw = layer.kernel_size
        heads_keys = [f"{name}.headconv_{i}" for i in range(heads)]
        width = f" (--squeeze-ratio {squeeze_ratio:g} gives {hidden} hidden units at {c_in} channels)"
        filters = self.stacked([f"{k}.conv.weight" for k in heads_keys], (c_out // heads, c_in, kh, kw))
        if filters is not None:
            # Head-major (H, n, C, kh, kw) into the dense layout: row j*H + i is head i's filter j.
            self.put(f"{name}.weight", interleave_head_major(filters))
        self.put(
            f"{name}.saliency_generator.reduce",
            self.stacked([f"{k}.fc1.weight" for k in heads_keys], (hidden, c_in), width),
        )
        self.put(
            f"{name}.saliency_generator.expand",
            self.stacked([f"{k}.fc2.weight" for k in heads_keys], (c_in, hidden), width),
        )
        self.put(f"{name}.saliency_generator.beta", self.stacked([f"{k}.fc2.bias" for k in heads_keys], (c_in,)))
        assert layer.norm is not None  # converted with preact=True
        for suffix, ours in layer.norm.state_dict().items():
            self.put(f"{name}.norm.{suffix}", self.fetch(f"{name}.norm.{suffix}", tuple(ours.shape)))
        key = f"{name}._inactive_channels"
        count = self.fetch(key, (1,))
        if count is None:
            return None
        inactive = float(count.reshape(-1)[0])
        if inactive != int(inactive) or not (0 <= inactive < c_in):
            raise LoadError(f"{self.file}: {key} = {inactive:g} is not a whole number of channels in [0, {c_in})")
        dropped = int(inactive)
        zeta_t = dropped / c_in
        if round(zeta_t * c_in) != dropped:  # cannot happen for C < 2**52; the layer computes k this way
            raise LoadError(f"{self.file}: {key} = {dropped} cannot be written as a ratio of {c_in} channels")
        self.put(f"{name}.zeta_t", torch.tensor(zeta_t, dtype=torch.float64))
        return ImportedLayer(name, c_in, c_out, heads, hidden, dropped, zeta_t, kept_channel_count(c_in, zeta_t))

    def check(self, ours: Mapping[str, Tensor], model_name: str) -> None:
        """Raise ``LoadError`` for missing, unexpected or misshapen tensors, and for
        tensors of ours that got no value."""
        if self.missing:
            raise LoadError(
                f"{self.file}: {len(self.missing)} tensors {model_name} needs are not in the checkpoint: {_listing(self.missing)}"
            )
        unexpected = [key for key in self.state if key not in self.used]
        if unexpected:
            raise LoadError(
                f"{self.file}: {len(unexpected)} checkpoint tensors map to nothing in {model_name}: {_listing(unexpected)}"
            )
        if self.bad_shapes:
            more = f" (and {len(self.bad_shapes) - 1} more)" if len(self.bad_shapes) > 1 else ""
            raise LoadError(f"{self.file}: {self.bad_shapes[0]}{more}")
        unset = [key for key in ours if key not in self.mapped]
        if unset:
            raise LoadError(
                f"{self.file}: {len(unset)} tensors of the converted {model_name} get no value from the checkpoint: {_listing(unset)}"
            )


def import_authors_checkpoint(
    path: str | Path,
    *,
    model: str = "resnet18",
    heads: int | None = 4,
    zeta: float = 0.55,
    squeeze_ratio: float = 16,
    num_classes: int | None = None,
) -> tuple[nn.Module, AuthorsImport]:
    """Build ``model`` as the authors' DGC network and load their checkpoint ``path`` into it.

    Args:
        path: the authors' checkpoint (``.pth.tar``), read weights-only.
        model: ``resnet18`` or ``resnet34`` (torchvision, no pretrained weights).
        heads: H; must agree with the number of ``headconv_*`` of every layer
            (None: take it from the file).
        zeta: the layers' target pruning ratio (their ``1 - gate_factor``);
            the ratio forward uses, ``zeta_t``, comes from the file's
            ``_inactive_channels``.
        squeeze_ratio: d of their ``--squeeze-rate`` (the hidden width is
            ``C // d``, d halved below 80 channels).
        num_classes: classifier width; read from ``fc.weight`` when None.

    Returns:
        The model in eval mode (``dgc_convert.save`` writes it, ``load``
        reads it back) and an ``AuthorsImport`` report.

    Raises:
        LoadError: the file cannot be read weights-only, or its tensors do
            not map one to one onto the model (the message names them).
        SettingsError: an unsupported model or bad settings.
    """
    file = Path(path)
    _check_settings(model, heads, zeta, squeeze_ratio)
    state = read_authors_state_dict(file)
    if num_classes is None and "fc.weight" in state and state["fc.weight"].dim() == 2:
        num_classes = int(state["fc.weight"].shape[0])
    net = create_model(model, source="torchvision", num_classes=num_classes)
    names = authors_dgc_layers(net)
    if not any(_heads_in_file(state, name) for name in names):
        raise LoadError(f"{file}: no headconv_* tensors: not one of the authors' DGC {model} checkpoints")
    for name in names:
        found = _heads_in_file(state, name)
        if found == 0:
            continue  # its tensors are reported missing below
        if heads is None:
            heads = found
        elif found != heads:
            raise LoadError(
                f"{file}: layer {name} has {found} heads (headconv_0..headconv_{found - 1}), --heads is {heads}"
            )
    assert heads is not None  # read from the first layer with heads, found above
    settings = LayerSettings(heads, squeeze_ratio, zeta, interleaved=True, preact=True, squeeze_rule="authors")
    apply_conversion(net, dict.fromkeys(names, settings))

    ours = net.state_dict()
    mapper = _Mapper(file, state)
    layers: list[ImportedLayer] = []
    for name in names:
        layer = net.get_submodule(name)
        assert isinstance(layer, DGCConv2d)  # converted just above
        imported = mapper.dgc_layer(name, layer, squeeze_ratio)
        if imported is not None:
            layers.append(imported)
    covered = tuple(f"{name}." for name in names)
    renamed = {
        f"{name.removesuffix('.0')}.1.": f"{name.removesuffix('.0')}.1.norm."
        for name in names
        if name.endswith(".downsample.0")
    }
    for key, tensor in ours.items():
        if key.startswith(covered):
            continue
        source = key
        for prefix, theirs in renamed.items():
            if key.startswith(prefix):
                source = theirs + key[len(prefix) :]
        hint = " (the classifier; pass num_classes to choose it)" if key.startswith("fc.") else ""
        mapper.put(key, mapper.fetch(source, tuple(tensor.shape), hint))
    mapper.check(ours, model)
    try:
        net.load_state_dict(mapper.mapped, strict=True)
    except RuntimeError as error:  # every name and shape was checked above
        raise LoadError(f"{file}: the mapped tensors do not load into {model}: {first_line(error, 200)}") from None
    net.eval()
    report = AuthorsImport(
        source=str(file),
        model=model,
        num_classes=int(ours["fc.weight"].shape[0]),
        heads=heads,
        squeeze_ratio=squeeze_ratio,
        zeta=zeta,
        layers=layers,
        tensors=len(mapper.used),
        parameters=sum(p.numel() for p in net.parameters()),
    )
    return net, report
