"""MAC counting: thop for dense layers, the method's formula for DGC layers."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from dgc_convert import DGCConv2d, convert, count_macs, create_model, set_zeta
from dgc_convert.macs import dgc_layer_macs, normalize_input_size


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dense_conv_and_linear_macs_match_torchvision_ops(name):
    model = create_model(f"torchvision:{name}")
    report = count_macs(model, 224)
    macs = report.macs_of(nn.Conv2d, nn.Linear, model=model)
    expected = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9
    assert abs(macs - expected) / expected < 0.01


def test_dgc_layer_follows_the_method_formula():
    layer = DGCConv2d(64, 128, 3, padding=1, heads=4, squeeze_ratio=16, zeta=0.5)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), layer)
    report = count_macs(model, (3, 14, 10))
    row = report.by_name()["1"]
    hidden = 4  # max(64 // 16, 4)
    expected = 4 * (2 * 64 * hidden + 9 * 32 * (128 // 4) * 14 * 10)
    assert row.macs == expected == dgc_layer_macs(layer, 14, 10)
    assert row.kind == "DGCConv2d"


def test_macs_follow_zeta_t_and_saving_is_close_to_zeta():
    model = create_model("torchvision:resnet18")
    dense = count_macs(model, 224).total_macs
    convert(model, heads=4, zeta=0.55)
    sparse = count_macs(model, 224).total_macs
    # The authors count 0.89 GMACs for ResNet-18-DGC (keep 45%) against 1.82 dense.
    assert 0.85e9 < sparse < 1.0e9
    set_zeta(model, 0.0)
    at_zero = count_macs(model, 224).total_macs
    assert at_zero > dense  # zeta 0 costs the dense convs plus the saliency generators
    assert count_macs(model, 224).total_params == sum(p.numel() for p in model.parameters())


def test_count_macs_restores_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model.train()
    count_macs(model, 16)
    assert model.training


@pytest.mark.parametrize("value, expected", [(32, (3, 32, 32)), ((20, 30), (3, 20, 30)), ((1, 8, 9), (1, 8, 9))])
def test_normalize_input_size(value, expected):
    assert normalize_input_size(value) == expected


def test_normalize_input_size_refuses_nonsense():
    with pytest.raises(ValueError, match="input_size"):
        normalize_input_size((0, 4))
