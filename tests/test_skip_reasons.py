"""Skip reasons are an enum with a detail; the line people read (table, ``--json``'s ``reason``) is
word for word the prose the decision used to carry."""

import json

import pytest
from torch import nn

from dgc_convert import ConversionError, ConvertSection, SkipReason, convert, plan_conversion

# Each reason with a detail as plan_conversion makes it, and the text it was recorded as before the enum.
TODAYS_TEXT = {
    SkipReason.CUSTOM_FORWARD: (
        "Doubling",
        "Doubling overrides nn.Conv2d.forward (computes its weight or input in a way a DGC layer does not know)",
    ),
    SkipReason.STEM: ("", "stem: sees the image"),
    SkipReason.GROUPED: ("groups=32", "grouped convolution (groups=32)"),
    SkipReason.PADDING_MODE: ("padding_mode='reflect'", "padding_mode='reflect' (only zeros)"),
    SkipReason.ASYMMETRIC_PADDING: ("padding='same'", "padding='same' pads asymmetrically"),
    SkipReason.TOO_FEW_CHANNELS: ("in_channels=8 < min_channels=16", "in_channels=8 < min_channels=16"),
    SkipReason.HEADS_DO_NOT_DIVIDE: (
        "out_channels=30 not divisible by heads=4",
        "out_channels=30 not divisible by heads=4",
    ),
    SkipReason.OVERRIDE: ("'body.*'", "override 'body.*' says skip"),
    SkipReason.NOT_INCLUDED: ("", "not matched by include"),
    SkipReason.EXCLUDED: ("", "matched by exclude"),
    SkipReason.NO_SAVING: (
        "259,072 MACs per sample against 256,000 dense, at its 1x1 output",
        "no saving as DGC (259,072 MACs per sample against 256,000 dense, at its 1x1 output)",
    ),
}


def test_every_reason_has_its_text():
    assert set(TODAYS_TEXT) == set(SkipReason)


@pytest.mark.parametrize("reason", list(SkipReason), ids=lambda r: r.name)
def test_each_skip_reason_reads_as_its_text_did(reason):
    detail, text = TODAYS_TEXT[reason]
    assert reason.text(detail) == text


class Doubling(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def every_rule_model():
    """One convolution per rule of plan_conversion (the stem sees the image)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),  # stem
        nn.Conv2d(32, 32, 3, padding=1),  # converts
        nn.Conv2d(32, 32, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),  # padding mode
        nn.Conv2d(32, 8, 3, padding=1),  # converts (8 outputs: the next has too few inputs)
        nn.Conv2d(8, 30, 3, padding=1),  # too few channels (checked before heads)
        nn.Conv2d(30, 30, 3, padding=1),  # 30 not divisible by 4 heads
        Doubling(30, 32, 3, padding=1),  # custom forward
        nn.Conv2d(32, 32, 3, padding=1),  # excluded below
    )


def test_decisions_carry_the_enum_and_detail_and_read_as_before():
    report = plan_conversion(every_rule_model(), ConvertSection(exclude=["8"]), input_size=(3, 16, 16))
    rows = {d.name: d for d in report.layers}
    assert {name: row.skip_reason for name, row in rows.items()} == {
        "0": SkipReason.STEM,
        "1": None,
        "2": SkipReason.GROUPED,
        "3": SkipReason.PADDING_MODE,
        "4": None,
        "5": SkipReason.TOO_FEW_CHANNELS,
        "6": SkipReason.HEADS_DO_NOT_DIVIDE,
        "7": SkipReason.CUSTOM_FORWARD,
        "8": SkipReason.EXCLUDED,
    }
    assert rows["1"].reason == "" and rows["1"].detail == ""
    assert rows["2"].detail == "groups=2" and rows["2"].reason == "grouped convolution (groups=2)"
    assert rows["5"].reason == "in_channels=8 < min_channels=16"
    assert rows["7"].reason.startswith("Doubling overrides nn.Conv2d.forward (")


def test_a_decision_as_data_keeps_its_fields_and_json_as_before():
    report = plan_conversion(every_rule_model(), ConvertSection(), input_size=(3, 16, 16))
    data = report.layers[2].to_dict()
    assert list(data) == [
        "name",
        "kind",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "groups",
        "status",
        "reason",
        "heads",
        "squeeze_ratio",
        "zeta",
        "gating",
        "preact",
        "squeeze_rule",
        "kept",
    ]
    assert data["status"] == "skipped" and data["reason"] == "grouped convolution (groups=2)"
    json.dumps(report.to_dict())  # no enum leaks into the data


def test_nothing_to_convert_lists_the_reasons_by_their_short_phrase():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 12, 3, groups=2))
    with pytest.raises(ConversionError) as refused:
        convert(model, input_size=(3, 16, 16))
    assert str(refused.value).endswith(
        "can be converted (grouped convolution; in_channels < min_channels; stem: sees the image)"
    )
