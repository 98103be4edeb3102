"""Why a convolution stays dense: ``SkipReason``, one member per rule of ``plan_conversion``.

A decision records the member and a free ``detail`` (the figures of this
layer: ``groups=32``, the MAC comparison, ...). Code that groups or counts
skipped layers reads the member; ``SkipReason.text(detail)`` writes the one
line the table and ``--json``'s ``reason`` field show, word for word what
they showed when the reason was kept as prose.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["SkipReason"]


class SkipReason(Enum):
    """Why ``plan_conversion`` keeps a convolution dense; the value is the short phrase that names
    the rule (the "nothing can be converted" error lists these)."""

    CUSTOM_FORWARD = "overrides nn.Conv2d.forward"
    STEM = "stem: sees the image"
    GROUPED = "grouped convolution"
    PADDING_MODE = "padding_mode other than zeros"
    ASYMMETRIC_PADDING = "pads asymmetrically"
    TOO_FEW_CHANNELS = "in_channels < min_channels"
    HEADS_DO_NOT_DIVIDE = "out_channels not divisible by heads"
    OVERRIDE = "override says skip"
    NOT_INCLUDED = "not matched by include"
    EXCLUDED = "matched by exclude"
    NO_SAVING = "no saving as DGC"

    def text(self, detail: str = "") -> str:
        """The line a person reads: this reason with ``detail`` (the layer's figures) filled in."""
        return _TEXTS[self].format(phrase=self.value, detail=detail)


# How each reason reads; {detail} is what the rule found in the layer (see plan_conversion's rules).
_TEXTS: dict[SkipReason, str] = {
    # detail: the convolution's class name
    SkipReason.CUSTOM_FORWARD: (
        "{detail} overrides nn.Conv2d.forward (computes its weight or input in a way a DGC layer does not know)"
    ),
    SkipReason.STEM: "{phrase}",
    SkipReason.GROUPED: "{phrase} ({detail})",  # detail: groups=N
    SkipReason.PADDING_MODE: "{detail} (only zeros)",  # detail: padding_mode='...'
    SkipReason.ASYMMETRIC_PADDING: "{detail} pads asymmetrically",  # detail: padding=...
    SkipReason.TOO_FEW_CHANNELS: "{detail}",  # detail: in_channels=C < min_channels=M
    SkipReason.HEADS_DO_NOT_DIVIDE: "{detail}",  # detail: out_channels=C not divisible by heads=H
    SkipReason.OVERRIDE: "override {detail} says skip",  # detail: the override's pattern, quoted
    SkipReason.NOT_INCLUDED: "{phrase}",
    SkipReason.EXCLUDED: "{phrase}",
    SkipReason.NO_SAVING: "{phrase} ({detail})",  # detail: the MAC comparison at the layer's output size
}
