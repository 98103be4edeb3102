"""Converting whole model zoos: every architecture converts (or says clearly why
not), still runs, and reproduces its original at zeta 0 with unit scores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dgc_convert import DGCConv2d, check_identity, convert, create_model
from dgc_convert.errors import ConversionError
from dgc_convert.measuring.macs import count_macs

# (name, input side): small inputs keep this quick on 2 cores.
ARCHITECTURES = [
    ("torchvision:resnet18", 64),
    ("torchvision:resnet50", 64),
    ("torchvision:densenet121", 64),
    ("torchvision:vgg11_bn", 64),
    ("torchvision:mobilenet_v2", 64),
    ("torchvision:mobilenet_v3_small", 64),
    ("torchvision:efficientnet_b0", 64),
    ("torchvision:regnet_x_400mf", 64),
    ("torchvision:regnet_y_400mf", 64),
    ("torchvision:convnext_tiny", 64),
    ("torchvision:inception_v3", 96),
    ("torchvision:shufflenet_v2_x0_5", 64),
    ("torchvision:googlenet", 64),
    ("torchvision:squeezenet1_1", 64),
    ("torchvision:mnasnet0_5", 64),
    ("torchvision:resnext50_32x4d", 64),
    ("timm:resnet18", 64),
    ("timm:tf_efficientnet_b0", 64),  # Conv2dSame (stem and depthwise: grouped, so dense)
    ("timm:tf_efficientnetv2_b0", 64),  # Conv2dSame in fused MBConv blocks: converted
    ("timm:resnetv2_50x1_bit", 64),  # StdConv2d
    ("timm:nf_resnet26", 64),  # ScaledStdConv2d
    ("timm:regnety_002", 64),
    ("timm:mobilenetv3_small_050", 64),
    ("timm:convnext_atto", 64),
    ("timm:densenet121", 64),
    ("timm:dla34", 64),
    ("timm:cspresnet50", 64),
    ("timm:ghostnet_100", 64),
    ("timm:repvgg_a0", 64),
    ("timm:vit_tiny_patch16_224", 224),
]


# Nothing converts: the clear error is the answer.
NOTHING_TO_CONVERT = {
    "timm:vit_tiny_patch16_224": "stem: sees the image",
}
# Families whose convolutions compute their weight or padding on the fly (timm's
# StdConv2d, ScaledStdConv2d, Conv2dSame): most of their MACs must convert.
CONVERT_MOST = {
    "timm:tf_efficientnet_b0",
    "timm:tf_efficientnetv2_b0",
    "timm:resnetv2_50x1_bit",
    "timm:nf_resnet26",
}


@pytest.mark.parametrize("name, side", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_architecture_converts_runs_and_passes_identity(name, side):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    model.eval()
    original = copy.deepcopy(model)
    if name in NOTHING_TO_CONVERT:
        with pytest.raises(ConversionError, match=NOTHING_TO_CONVERT[name]):
            convert(model, heads=4, zeta=0.5)
        assert not any(isinstance(m, DGCConv2d) for m in model.modules())
        return
    report = convert(model, heads=4, zeta=0.5, input_size=side)

    assert report.converted, "at least one convolution converted"
    if name in CONVERT_MOST:
        dense = count_macs(original, side)
        converted = {d.name for d in report.converted}
        share = sum(layer.macs for layer in dense.layers if layer.name in converted) / dense.total_macs
        assert share > 0.5, f"only {share:.0%} of the MACs are in converted layers"
    layers = [m for m in model.modules() if isinstance(m, DGCConv2d)]
    assert len(layers) == len(report.converted)
    assert len(report.layers) == sum(isinstance(m, nn.Conv2d) for m in original.modules())
    assert all(d.reason for d in report.skipped), "every skipped conv says why"
    assert report.layers[0].status == "skipped"  # the stem, or a conv that overrides forward

    x = torch.randn(2, 3, side, side)
    diff = check_identity(original, model, x)
    assert diff >= 0.0
    # The gated forward at zeta 0.5, in training mode: untrained eval-mode
    # BatchNorm (running variance 1) lets activations grow without bound in
    # deep nets, gated or not; batch statistics keep them finite.
    model.train()
    if getattr(model, "AuxLogits", None) is not None:
        model.AuxLogits = None  # Inception's training-only aux head needs 299 px inputs
    outputs = model(x)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]  # GoogLeNet's aux heads too
    outputs = [out for out in outputs if out is not None]
    assert outputs[0].shape == (2, 10)
    assert all(torch.isfinite(out).all() for out in outputs)
    sum(out.float().sum() for out in outputs).backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, DGCConv2d))


def test_bit_converts_its_body_and_keeps_the_classifier_dense_where_it_would_cost_more():
    # The case: BiT's classifier is a 1x1 conv on a 1x1 map, where the
    # saliency generators cost more than the channels they save.
    model = create_model("timm:resnetv2_50x1_bit")
    report = convert(model, heads=4, zeta=0.5)
    rows = {d.name: d for d in report.layers}
    assert rows["head.fc"].status == "skipped"
    assert rows["head.fc"].reason.startswith("no saving as DGC (3,121,152 MACs per sample against 2,048,000 dense")
    assert {d.kind for d in report.converted} == {"StdConv2d"}
    assert len(report.converted) == len(report.layers) - 2  # all but the stem and the classifier


def test_vit_fails_with_a_clear_error_and_is_untouched():
    model = create_model("timm:vit_tiny_patch16_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="no convolution of vit_tiny_patch16_224 can be converted"):
        convert(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
