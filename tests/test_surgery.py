"""convert(): eligibility, reasons, patterns, overrides, helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dgc_convert import (
    ConversionError,
    DGCConv2d,
    LayerOverride,
    check_identity,
    convert,
    dgc_layers,
    set_zeta,
    sparsity_loss,
)
from dgc_convert.errors import IdentityCheckError
from dgc_convert.nn.modes import dgc_mode


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, bias=False),  # body.0 converts
            nn.BatchNorm2d(32),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # body.2 depthwise
            nn.Conv2d(32, 30, 1),  # body.3: 30 not divisible by 4
            nn.Conv2d(30, 8, 1),  # body.4 converts
            nn.Conv2d(8, 16, 1),  # body.5: 8 < min_channels
            nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),  # body.6
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean((2, 3)))


def test_every_conv_gets_a_row_and_a_reason():
    model = Toy()
    report = convert(model)
    rows = {d.name: d for d in report.layers}
    assert list(rows) == ["stem", "body.0", "body.2", "body.3", "body.4", "body.5", "body.6"]
    assert rows["stem"].reason == "stem: sees the image"
    assert rows["body.2"].reason == "grouped convolution (groups=32)"
    assert rows["body.3"].reason == "out_channels=30 not divisible by heads=4"
    assert rows["body.5"].reason == "in_channels=8 < min_channels=16"
    assert "padding_mode='reflect'" in rows["body.6"].reason
    assert [d.name for d in report.converted] == ["body.0", "body.4"]
    assert rows["body.0"].kept == 16 and rows["body.4"].kept == 15
    assert isinstance(model.body[0], DGCConv2d) and isinstance(model.body[4], DGCConv2d)
    assert isinstance(model.body[2], nn.Conv2d)
    assert [n for n, _ in dgc_layers(model)] == ["body.0", "body.4"]


def test_include_exclude_and_overrides():
    model = Toy()
    report = convert(
        model, include=["body.*"], exclude=["body.4"], heads=2, overrides={"body.0": {"zeta": 0.25, "heads": 8}}
    )
    rows = {d.name: d for d in report.layers}
    assert rows["body.4"].reason == "matched by exclude"
    assert rows["stem"].reason == "not matched by include"
    assert (rows["body.0"].heads, rows["body.0"].zeta, rows["body.0"].kept) == (8, 0.25, 24)
    assert rows["body.3"].status == "converted" and rows["body.3"].heads == 2

    model = Toy()
    report = convert(model, overrides={"body.0": LayerOverride(skip=True)})
    assert report.layers[1].reason == "override 'body.0' says skip"


def test_overrides_skip_everything_is_an_error():
    with pytest.raises(ConversionError, match="no convolution of Toy can be converted"):
        convert(Toy(), overrides={"body.*": LayerOverride(skip=True)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include=["nothing*"]), "include pattern 'nothing\\*' matches no convolution"),
        (dict(exclude=["head"]), "exclude pattern 'head' matches no convolution"),
        (dict(overrides={"x.*": {"zeta": 0.1}}), "overrides pattern 'x.\\*'"),
        (dict(overrides={"body.0": {"zetta": 0.1}}), "unknown key 'zetta'"),
        (dict(overrides={"body.0": {"zeta": 1.2}}), "layer body.0: zeta must be in \\[0, 1\\), got 1.2"),
        (dict(zeta=1.5), "zeta must be in \\[0, 1\\), got 1.5"),
        (dict(heads=0), "heads must be a positive integer, got 0"),
        (dict(squeeze_ratio=0), "squeeze_ratio must be >= 1"),
        (dict(min_channels=0), "min_channels"),
    ],
)
def test_bad_settings_fail_before_touching_the_model(kwargs, message):
    model = Toy()
    with pytest.raises(ConversionError, match=message):
        convert(model, **kwargs)
    assert not dgc_layers(model)


def test_shared_conv_is_replaced_everywhere():
    shared = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), shared, nn.ReLU(), shared)
    report = convert(model)
    assert len(report.converted) == 1
    assert model[1] is model[3] and isinstance(model[1], DGCConv2d)


def test_check_identity_passes_and_restores_state():
    torch.manual_seed(0)
    model = Toy()
    original = copy.deepcopy(model)
    convert(model, zeta=0.75)
    model.train()
    diff = check_identity(original, model, torch.randn(2, 3, 12, 12))
    assert diff < 1e-4
    assert model.training
    assert all(float(layer.zeta_t) == 0.75 and not layer.unit_scores for _, layer in dgc_layers(model))


def test_check_identity_raises_on_mismatch():
    model = Toy()
    original = copy.deepcopy(model)
    convert(model)
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    with pytest.raises(IdentityCheckError, match="differs from the original"):
        check_identity(original, model, torch.randn(2, 3, 8, 8))


def test_set_zeta_and_sparsity_loss():
    model = Toy()
    convert(model, zeta=0.5, overrides={"body.4": {"zeta": 0.25}})
    set_zeta(model, fraction=0.5)
    assert [float(layer.zeta_t) for _, layer in dgc_layers(model)] == [0.25, 0.125]
    set_zeta(model, 0.0)
    assert all(float(layer.zeta_t) == 0.0 for _, layer in dgc_layers(model))
    assert float(sparsity_loss(model)) == 0.0
    model(torch.randn(2, 3, 8, 8))
    loss = sparsity_loss(model)
    assert loss.requires_grad and loss > 0
    with pytest.raises(ValueError):
        set_zeta(model)


# -- regressions from the architecture issue ----------------------------------------


def test_an_override_without_skip_keeps_an_earlier_skip():
    report = convert(Toy(), overrides={"body.*": {"skip": True}, "body.0": {"zeta": 0.7}, "body.4": {"skip": False}})
    rows = {d.name: d for d in report.layers}
    assert rows["body.0"].reason == "override 'body.*' says skip"  # zeta alone does not un-skip
    assert rows["body.4"].converted  # an explicit skip: false does


class ImageEntersLast(nn.Module):
    """A model whose first registered convolution is not the one that sees the image."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(32, 32, 3, padding=1)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        return self.head(self.stem(x))


def test_the_stem_is_the_convolution_that_receives_the_image():
    report = convert(ImageEntersLast())
    rows = {d.name: d for d in report.layers}
    assert rows["stem"].reason == "stem: sees the image"
    assert rows["head"].converted


def test_untraceable_models_fall_back_to_the_first_registered_convolution():
    class Untraceable(ImageEntersLast):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.head(self.stem(x))
            return self.stem(x)

    from dgc_convert import ConvertSection, plan_conversion

    # No trace, so no stem to read the input channels from: the input size is given.
    report = plan_conversion(Untraceable(), ConvertSection(), input_size=(3, 16, 16))
    assert {d.name: d.reason for d in report.layers} == {
        "head": "stem: sees the image",
        "stem": "in_channels=3 < min_channels=16",
    }


def test_plan_then_apply_equals_convert_and_plans_touch_nothing():
    from dgc_convert import ConvertSection, apply_conversion, plan_conversion

    torch.manual_seed(0)
    model, twin = Toy(), None
    twin = copy.deepcopy(model)
    plan = plan_conversion(model, ConvertSection(zeta=0.25))
    assert not dgc_layers(model) and [d.name for d in plan.converted] == ["body.0", "body.4"]
    apply_conversion(model, plan.layer_settings())
    convert(twin, zeta=0.25)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), twin.eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x))


def test_apply_conversion_names_a_module_that_cannot_take_the_settings():
    from dgc_convert import LayerSettings, apply_conversion

    model = Toy()
    with pytest.raises(ConversionError, match="layer body.9: no such module"):
        apply_conversion(model, {"body.9": LayerSettings(4, 16, 0.5)})
    with pytest.raises(ConversionError, match="layer body.1: a BatchNorm2d, not an nn.Conv2d"):
        apply_conversion(model, {"body.1": LayerSettings(4, 16, 0.5)})
    with pytest.raises(ConversionError, match="layer body.2: conv.groups must be 1"):
        apply_conversion(model, {"body.0": LayerSettings(4, 16, 0.5), "body.2": LayerSettings(4, 16, 0.5)})
    assert not dgc_layers(model)  # all or nothing


def test_converting_twice_says_already_converted():
    model = Toy()
    convert(model)
    with pytest.raises(ConversionError, match="already converted"):
        convert(model)


def test_the_api_and_the_schema_share_defaults_and_bounds():
    from dgc_convert import ConvertSection
    from dgc_convert.conversion.settings import convert_settings

    layer = DGCConv2d(16, 16, 3)
    defaults = ConvertSection()
    assert (layer.heads, layer.squeeze_ratio, layer.zeta) == (defaults.heads, defaults.squeeze_ratio, defaults.zeta)
    with pytest.raises(ConversionError, match=r"^heads must be a positive integer, got 'four'$"):
        convert_settings(heads="four")
    with pytest.raises(ConversionError, match=r"^unknown setting 'zetta'"):
        convert_settings(ConvertSection(), zetta=0.5)
    assert convert_settings(ConvertSection(heads=2), zeta=0.25).model_dump(exclude={"overrides"}) == {
        **ConvertSection().model_dump(exclude={"overrides"}),
        "heads": 2,
        "zeta": 0.25,
    }


# -- gating, pre-activation and squeeze rule ----------------------------------------------------


def test_gating_preact_and_squeeze_rule_reach_every_converted_layer():
    model = Toy()
    report = convert(model, gating="network", preact=True, squeeze_rule="authors")
    for decision in report.converted:
        assert (decision.gating, decision.preact, decision.squeeze_rule) == ("network", True, "authors")
        assert decision.to_dict()["gating"] == "network"
        settings = decision.settings
        assert settings is not None and (settings.gating, settings.preact, settings.squeeze_rule) == (
            "network",
            True,
            "authors",
        )
    assert all(d.gating is None and d.preact is None for d in report.skipped)
    for _, layer in dgc_layers(model):
        assert layer.gating == "network" and isinstance(layer.norm, nn.BatchNorm2d)
        assert layer.squeeze_rule == "authors" and layer.saliency_generator.init == "authors"
    # The defaults are the layer's own.
    plain = convert(Toy())
    assert {(d.gating, d.preact, d.squeeze_rule) for d in plain.converted} == {("head", False, "standard")}


def test_overrides_set_preact_and_squeeze_rule_per_layer_but_never_gating():
    model = Toy()
    report = convert(
        model, preact=True, overrides={"body.4": {"preact": False, "squeeze_rule": "authors"}, "body.0": {"heads": 2}}
    )
    rows = {d.name: d for d in report.converted}
    assert (rows["body.0"].preact, rows["body.0"].squeeze_rule, rows["body.0"].heads) == (True, "standard", 2)
    assert (rows["body.4"].preact, rows["body.4"].squeeze_rule) == (False, "authors")
    assert model.body[0].norm is not None and model.body[4].norm is None
    with pytest.raises(ConversionError, match=r"^layer body.0: gating is model-wide"):
        convert(Toy(), overrides={"body.0": {"gating": "network"}})
    with pytest.raises(ValueError, match="gating is model-wide"):
        LayerOverride(gating="network")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gating="global"), r"^gating must be one of head, network, got 'global'$"),
        (dict(squeeze_rule="se"), r"^squeeze_rule must be one of standard, authors, got 'se'$"),
        (dict(preact="sometimes"), r"^preact must be true or false, got 'sometimes'$"),
        (dict(overrides={"body.0": {"squeeze_rule": "x"}}), r"^layer body.0: squeeze_rule must be one of"),
    ],
)
def test_bad_gating_preact_or_squeeze_rule_is_one_line(kwargs, message):
    model = Toy()
    with pytest.raises(ConversionError, match=message):
        convert(model, **kwargs)
    assert not dgc_layers(model)


def test_check_identity_with_preact_layers_compares_with_norm_relu_conv():
    torch.manual_seed(0)
    model = Toy()
    original = copy.deepcopy(model)
    convert(model, zeta=0.75, preact=True, gating="network")
    with torch.no_grad():  # norms that do something: the reference must apply them too
        for _, layer in dgc_layers(model):
            assert layer.norm is not None
            layer.norm.running_mean.uniform_(-1.0, 1.0)
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.5, 0.5)
            layer.set_threshold(0.5)
    x = torch.randn(2, 3, 12, 12)
    model.train()
    assert check_identity(original, model, x) < 1e-4
    assert model.training and all(not isinstance(m, DGCConv2d) for m in original.modules())
    assert isinstance(original.body[0], nn.Conv2d)  # the reference is a copy
    # Without the reference the architectures differ: the plain original is far off.
    with dgc_mode(model, algorithm="masked", unit_scores=True, zeta_t=0.0), torch.no_grad():
        assert (model.eval()(x) - original.eval()(x)).abs().max() > 1e-2
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    with pytest.raises(IdentityCheckError, match="differs from the original"):
        check_identity(original, model, x)


def test_check_identity_with_a_shared_preact_layer():
    shared = nn.Conv2d(16, 16, 3, padding=1)
    original = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), shared, nn.ReLU(), shared)
    model = copy.deepcopy(original)
    convert(model, preact=True)
    with torch.no_grad():
        model[1].norm.running_mean.fill_(0.3)
    assert check_identity(original, model, torch.randn(2, 3, 8, 8)) < 1e-4


class WithConvClassifier(nn.Module):
    """A body that converts, then a classifier as a 1x1 conv on a 1x1 map (as BiT's head)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Conv2d(64, 256, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(256, classes, 1)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.stem(x)))).flatten(1)


def test_a_classifier_conv_on_a_1x1_map_is_kept_dense_with_its_cost():
    report = convert(WithConvClassifier(), heads=4, zeta=0.5, input_size=(3, 16, 16))
    rows = {d.name: d for d in report.layers}
    assert rows["body"].converted
    # DGC: 4 heads x 2 x 256 x 16 hidden (saliency) + 128 kept x 1000 = 160,768 against 256,000 dense...
    # at d = 16 that saves; at d = 4 the generators cost 4 x 2 x 256 x 64 = 131,072 + 128,000 > 256,000.
    assert rows["fc"].converted
    report = convert(WithConvClassifier(), heads=4, zeta=0.5, squeeze_ratio=4, input_size=(3, 16, 16))
    rows = {d.name: d for d in report.layers}
    assert rows["fc"].status == "skipped"
    assert rows["fc"].reason == "no saving as DGC (259,072 MACs per sample against 256,000 dense, at its 1x1 output)"
    assert rows["body"].converted  # 16x16 output: the generators are nothing beside what is saved


@pytest.mark.parametrize(
    "overrides, forced",
    [
        ({"fc": {"heads": 4}}, True),  # the exact name
        ({"f*": {"skip": False}}, True),  # an explicit un-skip
        ({"f*": {"heads": 4}}, False),  # a glob that only sets values does not force
        ({"fc": {"skip": True}}, False),  # named, but told to skip
        ({"*": {"skip": False}, "f?": {"skip": True}}, False),  # the later pattern wins
    ],
)
def test_an_override_naming_the_layer_converts_it_at_a_loss(overrides, forced):
    report = convert(WithConvClassifier(), squeeze_ratio=4, input_size=(3, 16, 16), overrides=overrides)
    row = next(d for d in report.layers if d.name == "fc")
    assert row.converted is forced
    if not forced:
        assert row.reason.startswith(("no saving as DGC", "override"))


def test_the_cost_is_weighed_at_the_given_input_size():
    # At 4x4 the body's output map is small enough for the generators to cost more.
    kwargs = {"heads": 4, "zeta": 0.05, "squeeze_ratio": 1}
    assert {d.name for d in convert(WithConvClassifier(), input_size=64, **kwargs).converted} == {"body"}
    with pytest.raises(
        ConversionError, match=r"no convolution of WithConvClassifier can be converted \(no saving as DGC"
    ):
        convert(WithConvClassifier(), input_size=1, **kwargs)


def test_zeta_0_saves_nothing_anywhere_and_says_so():
    with pytest.raises(ConversionError, match=r"can be converted \(no saving as DGC; stem: sees the image\)"):
        convert(WithConvClassifier(), zeta=0.0, input_size=16)


def test_a_model_that_cannot_run_at_the_input_size_is_one_clear_error():
    with pytest.raises(
        ConversionError,
        match=r"Sequential cannot run on a 3x2x2 input to find its feature sizes \(unflatten: .*\); pass input_size",
    ):
        convert(nn.Sequential(Toy(), nn.Unflatten(1, (2, 3))), input_size=(3, 2, 2))


def test_the_shape_pass_never_runs_the_model_itself():
    class Caching(WithConvClassifier):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            self.last_input = x  # a cache, as timm's attention-bias caches
            return super().forward(x)

    model = Caching()
    convert(model, input_size=16)
    # Tracing (for the stem) and the shape pass each ran a copy: nothing stored in the model.
    assert "last_input" not in vars(model) and Caching.calls == 2
    out = model(torch.randn(1, 3, 16, 16))
    assert type(out) is torch.Tensor and type(model.last_input) is torch.Tensor


def test_an_input_size_without_channels_takes_the_stems():
    class Grey(WithConvClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 64, 3, padding=1)

    report = convert(Grey(), input_size=16)  # (1, 16, 16), read off the stem
    assert [d.name for d in report.converted] == ["body", "fc"]
