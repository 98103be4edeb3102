"""DGC layers built from timm's weight-standardised and TF-'SAME' convolutions compute
what the originals compute: standardisation (eps, gain, scale) and dynamic padding in
every path, gradients to weight and gain, BN/standardisation folding, save and load."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

from dgc_convert import DGCConv2d, check_identity, convert, create_model
from dgc_convert.nn import compiled
from dgc_convert.nn.conv_kinds import ConvKind, WeightStandardization, conv_kind, same_padding
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.nn.sparse import ALGORITHMS
from dgc_convert.serving.prepare import fold_batchnorm, prepare_for_inference

# Every source here is a 3x3 or 4x4 convolution: the pointwise algorithm does not apply.
SPARSE = [a for a in ALGORITHMS if a != "gather_pointwise"]


def _std(stride: int = 1) -> nn.Conv2d:
    return StdConv2d(32, 64, 3, stride=stride, eps=1e-5)


def _scaled(stride: int = 1) -> nn.Conv2d:
    conv = ScaledStdConv2d(32, 64, 3, stride=stride, gamma=1.7, eps=1e-4)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)  # a trained gain, not its all-ones init
    return conv


SOURCES = {
    "StdConv2d": lambda: _std(),
    "StdConv2d/2": lambda: _std(2),
    "ScaledStdConv2d": lambda: _scaled(),
    "ScaledStdConv2d/2": lambda: _scaled(2),
    "StdConv2dSame/2": lambda: StdConv2dSame(32, 64, 3, stride=2, padding="SAME", eps=1e-6),
    "ScaledStdConv2dSame/2": lambda: ScaledStdConv2dSame(32, 64, 3, stride=2, padding="SAME", gamma=1.2),
    "Conv2dSame/2": lambda: Conv2dSame(32, 64, 3, stride=2, bias=True),
    "Conv2dSame 4x4/2": lambda: Conv2dSame(32, 64, 4, stride=2),
}


def _source(name: str) -> nn.Conv2d:
    torch.manual_seed(0)
    return SOURCES[name]().double()


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("side", [15, 16])  # odd and even: TF-'SAME' is asymmetric at one of them
def test_zeta_0_with_unit_scores_equals_the_original_in_every_path(name, side):
    conv = _source(name)
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5)
    x = torch.randn(3, 32, side, side, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
    for algorithm in ["masked", "export", *SPARSE]:
        for training in (True, False):
            layer.train(training)
            with dgc_mode(layer, algorithm=algorithm, unit_scores=True, zeta_t=0.0), torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=f"{algorithm}, training={training}")


@pytest.mark.parametrize("name", list(SOURCES))
def test_weight_and_gain_gradients_equal_the_originals(name):
    conv = _source(name)
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5)
    x = torch.randn(2, 32, 15, 15, dtype=torch.float64)
    grad = torch.randn_like(conv(x))
    conv(x).backward(grad)
    with dgc_mode(layer, unit_scores=True, zeta_t=0.0):
        layer.train()
        layer(x).backward(grad)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, rtol=1e-9, atol=1e-12)
    if getattr(conv, "gain", None) is not None:
        assert layer.gain is not None
        torch.testing.assert_close(layer.gain.grad, conv.gain.grad, rtol=1e-9, atol=1e-12)
    else:
        assert layer.gain is None


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_eval_path_agrees_at_zeta_half(name):
    conv = _source(name)
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5).eval()
    x = torch.randn(3, 32, 15, 15, dtype=torch.float64)
    with torch.no_grad():
        reference = layer.train()(x)  # the training computation, on batch statistics of nothing: no norms here
        layer.eval()
        for algorithm in ["export", *SPARSE]:
            with dgc_mode(layer, algorithm=algorithm):
                torch.testing.assert_close(layer(x), reference, rtol=1e-9, atol=1e-10, msg=algorithm)


@pytest.mark.skipif(not compiled.available(), reason="the compiled op could not be built here")
@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("side", [15, 16])
def test_the_compiled_op_agrees_or_hands_over_to_the_sparse_path(name, side):
    conv = _source(name).float()
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5).eval()
    x = torch.randn(2, 32, side, side)
    with torch.no_grad(), dgc_mode(layer, algorithm="masked"):
        reference = layer(x)
    with torch.no_grad():
        got = layer(x)  # "auto"
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    pads = layer.same_padding_for(x)
    asymmetric = pads is not None and (pads[0] != pads[1] or pads[2] != pads[3])
    assert (layer.last_algorithm == "compiled") is (not asymmetric)
    if asymmetric:
        with (
            pytest.raises(ValueError, match="TF-'SAME' padding is one pixel larger"),
            dgc_mode(layer, algorithm="compiled"),
        ):
            layer(x)


def test_the_standardised_weight_follows_weight_and_gain_updates_in_eval():
    conv = _source("ScaledStdConv2d")
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5).eval()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    for algorithm in SPARSE:
        with torch.no_grad(), dgc_mode(layer, algorithm=algorithm):
            bias = layer.bias.view(1, -1, 1, 1)
            before = layer(x)
            layer.gain.mul_(2.0)  # every standardised filter doubles
            torch.testing.assert_close(layer(x) - bias, 2 * (before - bias))
            layer.gain.div_(2.0)
            for change in (lambda w: w.mul_(3.0), lambda w: w.add_(torch.randn_like(w))):
                change(layer.weight)  # an optimizer step, in place
                with dgc_mode(layer, algorithm="masked"):
                    expected = layer(x)  # standardises afresh on every call
                torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def test_conv_kind_recognises_timm_classes_by_their_forward_only():
    assert conv_kind(nn.Conv2d(3, 3, 1)) == ConvKind()
    assert conv_kind(StdConv2d(3, 3, 1, eps=1e-5)) == ConvKind(WeightStandardization(1e-5))
    scaled = ScaledStdConv2d(3, 4, 3, gamma=2.0)
    assert conv_kind(scaled) == ConvKind(WeightStandardization(1e-6, 2.0 / 27**0.5))
    # 'SAME' that is static at stride 1 pads like nn.Conv2d; at stride 2 it is dynamic.
    assert conv_kind(StdConv2dSame(3, 3, 3, stride=1)) == ConvKind(WeightStandardization(1e-6), same_padding=False)
    assert conv_kind(StdConv2dSame(3, 3, 3, stride=2)).same_padding
    assert conv_kind(Conv2dSame(3, 3, 3, stride=2)) == ConvKind(same_padding=True)

    class OwnForward(StdConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class SameForward(StdConv2d):
        pass

    assert conv_kind(OwnForward(3, 3, 1)) is None
    assert conv_kind(SameForward(3, 3, 1)) == ConvKind(WeightStandardization(1e-6))


def test_same_padding_matches_tensorflow():
    # out = ceil(in / stride); an odd total puts the extra pixel on the right/bottom.
    assert same_padding((16, 15), (3, 3), (2, 2), (1, 1)) == (1, 1, 0, 1)
    assert same_padding((7, 7), (1, 1), (2, 2), (1, 1)) == (0, 0, 0, 0)


def test_a_conv_with_an_unknown_forward_is_kept_dense_with_its_reason():
    class Doubling(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 32, 3), Doubling(32, 32, 3), nn.Conv2d(32, 32, 3))
    report = convert(model, input_size=(3, 16, 16))
    reasons = {d.name: d.reason for d in report.layers}
    assert "Doubling overrides nn.Conv2d.forward" in reasons["1"]
    with pytest.raises(ValueError, match="overrides nn.Conv2d.forward"):
        DGCConv2d.from_conv(Doubling(32, 32, 3))


def test_prepare_stores_the_standardised_weights_and_then_folds_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        StdConv2d(32, 32, 3),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _scaled(),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        StdConv2dSame(64, 64, 3, stride=2),
    ).double()
    for bn in (model[2], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    dense = copy.deepcopy(model)
    convert(model, heads=4, zeta=0.5, include=["4"], input_size=(3, 24, 24))
    assert isinstance(model[4], DGCConv2d) and model[4].standardization is not None
    x = torch.randn(2, 3, 23, 23, dtype=torch.float64)
    with torch.no_grad():
        expected_dense, expected_dgc = dense.eval()(x), model.eval()(x)
    with pytest.raises(ValueError, match="fold its standardisation first"):
        fold_batchnorm(model[1], model[2])
    for prepared, expected in ((dense, expected_dense), (model, expected_dgc)):
        report = prepare_for_inference(prepared, channels_last=False, pack=False)
        assert report.standardized == 3
        assert len(report.folded) == 2  # both BatchNorms, now that the weights are plain
        assert type(prepared[1]) is nn.Conv2d and type(prepared[7]) is Conv2dSame
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), expected, rtol=1e-9, atol=1e-9)
    assert model[4].standardization is None and model[4].gain is None


@pytest.mark.parametrize(
    "name, kind",
    [("timm:resnetv2_50x1_bit", "StdConv2d"), ("timm:nf_resnet26", "ScaledStdConv2d")],
)
def test_weight_standardised_zoo_models_save_load_and_check(tmp_path, name, kind):
    from dgc_convert import load, save

    torch.manual_seed(0)
    model = create_model(name, num_classes=8)
    original = copy.deepcopy(model)
    report = convert(model, heads=4, zeta=0.5, input_size=64)
    assert {d.kind for d in report.converted} == {kind}
    check_identity(original, model, torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, DGCConv2d)):
            layer.saliency_generator.beta.uniform_(0.5, 1.5)  # trained gates, not the init
            if layer.gain is not None:  # NF-ResNets start each block's last gain at 0: keep those 0
                layer.gain.mul_(torch.empty_like(layer.gain).uniform_(0.8, 1.2))
    path = save(model, tmp_path / "model.safetensors", input_size=64)
    loaded = load(path)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_tf_same_layers_export_with_a_dynamic_size_that_pads_odd_sides_right(tmp_path):
    # Both default check sizes are even; the padding of a stride-2 'SAME' layer
    # differs on an odd side, so the export checks one odd size too.
    import onnxruntime

    from dgc_convert.serving.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), Conv2dSame(32, 32, 3, stride=2), StdConv2dSame(32, 32, 3, stride=2)
    )
    convert(model, include=["1", "2"], input_size=(3, 32, 32))
    assert all(isinstance(model[i], DGCConv2d) and model[i].same_padding for i in (1, 2))
    report = export_onnx(model, tmp_path / "same.onnx", input_size=(3, 32, 32), dynamic_size=True)
    assert report.passed and (65, 65) in report.checked_sizes
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    model.eval()
    for side in (31, 33):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
