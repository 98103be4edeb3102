"""Build a model by name from timm or torchvision, one way for both."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from dgc_convert.conversion.name_cache import cached_names, remember_names
from dgc_convert.conversion.network import hub_endpoint, hub_offline, unreachable
from dgc_convert.errors import SettingsError, UnknownModelError, first_line

if TYPE_CHECKING:  # torch loads with the first model built, not to resolve a name
    from torch import nn

Library = Literal["timm", "torchvision"]
SOURCES = ("auto", "timm", "torchvision")


@dataclass(frozen=True)
class ModelInfo:
    """What was built: the name, the library it came from, its default input
    size (channels, height, width) and class count. Attached to the model as
    ``model.dgc_model_info`` by ``create_model``."""

    name: str
    library: Library
    input_size: tuple[int, int, int]
    num_classes: int | None
    auto_picked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_info(model: nn.Module) -> ModelInfo | None:
    """The ``ModelInfo`` that ``create_model`` attached to ``model``, or None for a model built elsewhere."""
    info = getattr(model, "dgc_model_info", None)
    return info if isinstance(info, ModelInfo) else None


def require_model_info(model: nn.Module) -> ModelInfo:
    """``model_info(model)``, for models that must come from ``create_model`` or ``load``."""
    info = model_info(model)
    if info is None:
        raise ValueError(f"{type(model).__name__} was not built by dgc_convert.create_model (no dgc_model_info)")
    return info


def attach_model_info(model: nn.Module, info: ModelInfo) -> None:
    """Record what ``model`` is (``model.dgc_model_info``): what save/load, bench and eval rebuild it from."""
    model.dgc_model_info = info  # type: ignore[assignment]  # a plain attribute, not a submodule or tensor


def torchvision_names() -> list[str]:
    """Classification model names torchvision can build (remembered for ``resolve``: ``name_cache``)."""
    import torchvision  # on demand: its import loads torch's compiler stack, seconds

    return remember_names("torchvision", lambda: torchvision.models.list_models(module=torchvision.models))


def timm_names() -> list[str]:
    """Model names timm can build (remembered for ``resolve``: ``name_cache``)."""
    import timm  # imported on demand: it takes seconds, and torchvision names need none of it

    return remember_names("timm", timm.list_models)


def timm_tagged_names() -> list[str]:
    """timm's ``ARCH.TAG`` names: each architecture with each of its pretrained configurations
    (``resnet50.a1_in1k``), all of which ``timm.create_model`` takes (remembered: ``name_cache``)."""
    import timm

    return remember_names("timm", lambda: timm.list_models(pretrained=True), kind="tags")


def _resolve_tagged(name: str, auto: bool) -> tuple[str, Library, bool]:
    """A timm ``ARCH.TAG`` name; ``UnknownModelError`` listing the architecture's tags when the
    tag is not one of them, with close matches otherwise."""
    known = cached_names("timm", "tags")
    if known is not None and name in known:
        return name, "timm", auto
    tagged = timm_tagged_names()
    if name in tagged:
        return name, "timm", auto
    arch, _, tag = name.partition(".")
    tags = sorted(n.partition(".")[2] for n in tagged if n.partition(".")[0] == arch)
    if tags:
        shown_tags = ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
        raise UnknownModelError(f"unknown pretrained tag {tag!r} for timm model {arch!r}; its tags: {shown_tags}")
    close = difflib.get_close_matches(name, tagged, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `dgc-convert list-models PATTERN --tags`"
    raise UnknownModelError(f"unknown model {name!r} in timm{hint}")


def _resolved_from_cache(name: str, source: str) -> Library | None:
    """The library a cached name list says builds ``name``, honouring ``auto``'s preference for
    torchvision; None when the caches cannot decide (the libraries are asked then)."""
    torchvision_known = cached_names("torchvision") if source in ("auto", "torchvision") else None
    if torchvision_known is not None and name in torchvision_known:
        return "torchvision"
    # A timm hit decides only once torchvision (when it counts) is known not to build the name.
    if source == "timm" or (source == "auto" and torchvision_known is not None):
        timm_known = cached_names("timm")
        if timm_known is not None and name in timm_known:
            return "timm"
    return None


def list_models(pattern: str = "*", *, tags: bool = False) -> list[tuple[str, Library]]:
    """(name, library) for every model whose name matches the glob ``pattern``
    (case-insensitive; a pattern without wildcards matches as a substring); with ``tags``,
    timm's pretrained ``ARCH.TAG`` names are listed too."""
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    pattern = pattern.lower()
    found: list[tuple[str, Library]] = [(n, "torchvision") for n in torchvision_names() if fnmatch.fnmatch(n, pattern)]
    timm_listed = timm_names() + (timm_tagged_names() if tags else [])
    found += [(n, "timm") for n in sorted(set(timm_listed)) if fnmatch.fnmatch(n, pattern)]
    return sorted(found)


def resolve(name: str, source: str = "auto") -> tuple[str, Library, bool]:
    """Which library builds ``name``: returns (bare name, library, picked automatically).

    ``timm:NAME`` and ``torchvision:NAME`` force the library. ``auto`` prefers
    torchvision (the paper's ResNets are torchvision-style), then timm. timm's
    pretrained tags (``resnet50.a1_in1k``) are timm names. Unknown names raise
    ``UnknownModelError`` with up to five close matches (a tag: the architecture's tags).
    """
    if source not in SOURCES:
        raise UnknownModelError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    prefix, sep, bare = name.partition(":")
    if sep:
        if prefix not in ("timm", "torchvision"):
            raise UnknownModelError(f"unknown library prefix {prefix!r} in {name!r}; use timm:NAME or torchvision:NAME")
        if source != "auto" and source != prefix:
            raise UnknownModelError(f"{name!r} names library {prefix} but source is {source}")
        source, name = prefix, bare
    if "." in name and source in ("auto", "timm"):  # timm's ARCH.TAG: torchvision names hold no dot
        return _resolve_tagged(name, source == "auto")
    cached = _resolved_from_cache(name, source)
    if cached is not None:
        return name, cached, source == "auto"
    tv = torchvision_names()
    if source in ("auto", "torchvision") and name in tv:
        return name, "torchvision", source == "auto"
    tm = timm_names()
    if source in ("auto", "timm") and name in tm:
        return name, "timm", source == "auto"
    candidates = sorted(set({"auto": tv + tm, "torchvision": tv, "timm": tm}[source]))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    where = "timm or torchvision" if source == "auto" else source
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `dgc-convert list-models PATTERN`"
    raise UnknownModelError(f"unknown model {name!r} in {where}{hint}")


def default_input_size(name: str, library: Library) -> tuple[int, int, int]:
    """The model's own input size (channels, height, width), from timm's
    pretrained config or torchvision's weights transforms (224, or 299 for
    Inception-v3); no download."""
    if library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size:
            return tuple(cfg.input_size)  # type: ignore[return-value]
        return (3, 224, 224)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        crop = weights.transforms().crop_size[0]
        return (3, int(crop), int(crop))
    except (ValueError, AttributeError, KeyError):
        return (3, 224, 224)


def _hub_unreachable(bare: str) -> str | None:
    """Why the hub holding timm's weights for ``bare`` cannot be reached, or None (reachable, or not on the hub)."""
    import timm

    config = timm.models.get_pretrained_cfg(bare)
    if config is None or not config.hf_hub_id:
        return None
    return unreachable(hub_endpoint())


def _describe(kwargs: dict[str, Any], pretrained: bool) -> str:
    settings = [f"{key}={value!r}" for key, value in kwargs.items()] + (["pretrained weights"] if pretrained else [])
    return ", ".join(settings) or "its defaults"


def create_model(
    name: str,
    *,
    source: str = "auto",
    num_classes: int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build the model ``name`` from timm or torchvision.

    Args:
        name: a model name, or ``timm:NAME`` / ``torchvision:NAME``.
        source: ``auto`` (torchvision first, then timm), ``timm`` or ``torchvision``.
        num_classes: classifier width; the library default when None.
        pretrained: download the library's default weights (the only path that
            touches the network).

    Returns:
        The model, with ``model.dgc_model_info`` (a ``ModelInfo``) attached.
    """
    bare, library, auto_picked = resolve(name, source)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    # timm's weights live on the Hugging Face hub, whose client retries for about
    # 50 s without a network: ask once, and read its cache alone when it is out of reach.
    offline = _hub_unreachable(bare) if library == "timm" and pretrained else None
    try:
        if library == "timm":
            import timm

            with hub_offline() if offline else contextlib.nullcontext():
                model = timm.create_model(bare, pretrained=pretrained, **kwargs)
        else:
            import torchvision

            if bare in ("inception_v3", "googlenet") and not pretrained:
                # Keep today's init and silence torchvision's warning that it will change.
                kwargs.setdefault("init_weights", True)
            model = torchvision.models.get_model(bare, weights="DEFAULT" if pretrained else None, **kwargs)
    except (ValueError, TypeError) as error:  # the library refusing these settings (e.g. class count vs weights)
        raise SettingsError(
            f"{library} cannot build {bare} with {_describe(kwargs, pretrained)}: {first_line(error)}"
        ) from None
    except OSError as error:  # downloading weights without a network, a full cache disk
        if offline:
            from huggingface_hub import constants

            raise SettingsError(
                f"{bare}: pretrained weights are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                f"the hub cannot be reached ({offline}); connect once to download them, or start from a "
                "weights file with --checkpoint / model.checkpoint"
            ) from None
        raise SettingsError(f"{bare}: pretrained weights could not be fetched ({first_line(error)})") from None
    classes = num_classes
    if classes is None:
        classes = getattr(model, "num_classes", None) or getattr(getattr(model, "fc", None), "out_features", None)
    attach_model_info(model, ModelInfo(bare, library, default_input_size(bare, library), classes, auto_picked))
    return model
