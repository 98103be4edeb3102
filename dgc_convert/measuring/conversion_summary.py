"""The conversion summary the CLI shows: build, convert, count, optionally check.

One function, ``summarize_conversion``, runs the whole first-run pipeline and
returns plain data (``ConversionSummary``) that ``render`` turns into tables
or JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dgc_convert.conversion.build import build_model
from dgc_convert.conversion.settings import ConvertSection, ModelSection
from dgc_convert.conversion.shapes import normalize_input_size
from dgc_convert.conversion.surgery import ConversionReport, LayerDecision, check_identity
from dgc_convert.conversion.zoo import require_model_info
from dgc_convert.measuring.macs import count_macs
from dgc_convert.measuring.memory import available_memory, require_memory
from dgc_convert.nn.settings import LayerSettings, SettingsFields
from dgc_convert.progress import NO_PROGRESS, Progress

__all__ = ["ConversionSummary", "LayerRow", "summarize_conversion"]


@dataclass
class LayerRow(SettingsFields):
    """One convolution: geometry, decision and MACs per sample before and after.

    ``settings`` are the DGC layer's (None when kept dense), each also read as
    the row's own attribute (``row.heads``); under network gating ``kept`` and
    ``dgc_macs`` are what the model-wide threshold aims at (expected at the target).
    """

    name: str
    kind: str
    geometry: str
    status: str
    reason: str
    settings: LayerSettings | None
    kept: int | None
    dense_macs: int
    dgc_macs: int

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data, every user setting by name (None when kept dense)."""
        data = asdict(self)
        del data["settings"]
        return {**data, **self.settings_dict()}


@dataclass
class ConversionSummary:
    """Everything ``dgc-convert MODEL`` reports (MACs per sample, integers).

    ``totals["dgc_macs_expected"]`` is True when the model is network-gated
    (DGC-G): its DGC MACs are then the cost expected at the target.
    ``totals["saves_nothing"]`` is True when the converted model costs at least
    as many MACs per sample as the dense one.
    """

    model: str
    library: str
    auto_picked: bool
    input_size: tuple[int, int, int]
    settings: dict[str, Any]
    layers: list[LayerRow]
    totals: dict[str, Any]
    identity_max_diff: float | None = None
    converted_model: nn.Module | None = field(default=None, repr=False)
    report: ConversionReport | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape: model, library, input_size, settings, layers, totals (and check)."""
        data = {
            "model": self.model,
            "library": self.library,
            "input_size": list(self.input_size),
            "settings": self.settings,
            "layers": [row.to_dict() for row in self.layers],
            "totals": self.totals,
        }
        if self.identity_max_diff is not None:
            data["check"] = {"identity_max_diff": self.identity_max_diff, "passed": True}
        return data


def _geometry(decision: LayerDecision) -> str:
    kh, kw = decision.kernel_size
    text = f"{decision.in_channels}->{decision.out_channels} {kh}x{kw}"
    if decision.stride != (1, 1):
        text += f" /{decision.stride[0]}" if decision.stride[0] == decision.stride[1] else f" /{decision.stride}"
    if decision.groups != 1:
        text += f" g{decision.groups}"
    return text


CHECK_BATCH = 2  # images the identity check runs


def summarize_conversion(
    model_spec: ModelSection, settings: ConvertSection, *, check: bool = False, progress: Progress = NO_PROGRESS
) -> ConversionSummary:
    """Build the model ``model_spec`` names, convert it with ``settings``, count MACs per sample before and after.

    ``model_spec.input_size`` is the square side in pixels (the model's
    default when None). With ``check`` the converted model is compared with
    the original at zeta 0 and unit scores (``check_identity``) on a batch of
    two random images. ``progress`` is told each step.
    """
    progress.step(f"building and converting {model_spec.name}")
    built = build_model(model_spec, settings.model_copy(update={"enabled": True}), keep_dense=True)
    model, dense_model, report = built.model, built.dense, built.report
    assert dense_model is not None and report is not None  # keep_dense, and conversion enabled
    info = require_model_info(model)
    size = (
        info.input_size
        if model_spec.input_size is None
        else normalize_input_size(model_spec.input_size, info.input_size[0])
    )
    model.eval()
    progress.step(f"counting MACs per sample at {size[1]}x{size[2]}")
    dense = count_macs(dense_model, size)
    converted = count_macs(model, size)
    dense_by_name, dgc_by_name = dense.by_name(), converted.by_name()
    rows = [
        LayerRow(
            name=d.name,
            kind=d.kind,
            geometry=_geometry(d),
            status=d.status,
            reason=d.reason,
            settings=d.settings,
            kept=d.kept,
            dense_macs=dense_by_name[d.name].macs if d.name in dense_by_name else 0,
            dgc_macs=dgc_by_name[d.name].macs if d.name in dgc_by_name else 0,
        )
        for d in report.layers
    ]
    identity = None
    if check:
        # Before any real forward: one line when the check's activations would not fit.
        require_memory(
            max(dense.forward_memory(CHECK_BATCH), converted.forward_memory(CHECK_BATCH)),
            available_memory(),
            doing=f"--check at {size[1]}x{size[2]} would hold about",
            advice="check at a smaller --input-size (counting MACs needs no memory)",
        )
        progress.step("checking the converted model equals the original at zeta 0")
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(CHECK_BATCH, *size, generator=generator)
        identity = check_identity(dense_model, model, example)
    totals = {
        "dense_macs": dense.total_macs,
        "dgc_macs": converted.total_macs,
        "dgc_macs_expected": converted.expected,
        "saving": 1.0 - converted.total_macs / dense.total_macs if dense.total_macs else 0.0,
        "dense_params": dense.total_params,
        "dgc_params": converted.total_params,
        "converted_layers": len(report.converted),
        "convolutions": len(report.layers),
        # Layers that would cost more stay dense, so only overrides forcing them get here.
        "saves_nothing": converted.total_macs >= dense.total_macs,
    }
    return ConversionSummary(
        model=info.name,
        library=info.library,
        auto_picked=info.auto_picked,
        input_size=size,
        settings=settings.model_dump(mode="json", exclude={"enabled"}),
        layers=rows,
        totals=totals,
        identity_max_diff=identity,
        converted_model=model,
        report=report,
    )
