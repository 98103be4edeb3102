"""inspect: keep frequencies per head and channel, heat maps, JSON, collapse flags."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dgc_convert import convert, create_model, dgc_layers, save
from dgc_convert.cli import app
from dgc_convert.measuring.gate_usage import channel_usage
from dgc_convert.training.data import build_data
from dgc_convert.training.recipe import DataSection


@pytest.fixture()
def model():
    torch.manual_seed(0)
    built = create_model("resnet18", num_classes=10)
    convert(built, zeta=0.5, include=["layer1.*", "layer2.*"])
    return built.eval()


def _val():
    return build_data(
        DataSection(dataset="synthetic", synthetic_size=24, augmentation="none"), image_size=32, num_classes=10, seed=0
    ).val


def test_frequencies_are_fractions_of_samples_and_each_head_keeps_k(model):
    usage = channel_usage(model, _val(), batch_size=10)
    assert [u.name for u in usage] == [n for n, _ in dgc_layers(model)]
    for layer in usage:
        assert layer.samples == 24 and layer.frequency.shape == (layer.heads, layer.in_channels)
        assert ((layer.frequency >= 0) & (layer.frequency <= 1)).all()
        # every sample keeps exactly k channels per head
        torch.testing.assert_close(layer.frequency.sum(1), torch.full((layer.heads,), float(layer.kept)))


def test_collapsed_heads_are_flagged(model):
    layers = dgc_layers(model)
    with torch.no_grad():
        layers[0][1].saliency_generator.beta.fill_(-100.0)  # every score zero
        layers[1][1].saliency_generator.reduce.zero_()  # constant scores: the same channels for every sample
    usage = {u.name: u for u in channel_usage(model, _val())}
    assert usage[layers[0][0]].collapsed == [(h, "scores all zero") for h in range(4)]
    assert usage[layers[1][0]].collapsed == [(h, "keeps the same channels for every sample") for h in range(4)]
    assert not usage[layers[2][0]].collapsed


def test_inspect_command_writes_readable_pngs_and_json(tmp_path, model):
    with torch.no_grad():
        dgc_layers(model)[1][1].saliency_generator.reduce.zero_()
    path = save(model, tmp_path / "m.safetensors", input_size=32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\ndata: {dataset: synthetic, synthetic_size: 16}\n")
    out = tmp_path / "inspect"
    result = CliRunner().invoke(app, ["inspect", str(path), "--data", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"heat maps in {out}/" in result.stdout and "collapsed: layer1.0.conv2 head 0" in result.stdout
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(dgc_layers(model))
    with Image.open(pngs[0]) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 150
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "synthetic" and len(summary["layers"]) == len(pngs)
    first = summary["layers"][0]
    assert len(first["frequency"]) == first["heads"] and len(first["frequency"][0]) == first["in_channels"]
    assert {"layer": "layer1.0.conv2", "head": 0, "reason": "keeps the same channels for every sample"} in summary[
        "collapsed"
    ]
