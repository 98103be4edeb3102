"""Evaluation: accuracy, and realised MACs against the static count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dgc_convert import convert, create_model, dgc_layers, save
from dgc_convert.cli import app
from dgc_convert.measuring.evaluate import evaluate
from dgc_convert.measuring.macs import count_macs
from dgc_convert.training.data import build_data
from dgc_convert.training.recipe import DataSection


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = create_model("resnet18", num_classes=10)
    convert(built, zeta=0.5)
    return built.eval()


def _data(name):
    return build_data(
        DataSection(dataset=name, synthetic_size=40, augmentation="none"), image_size=32, num_classes=10, seed=0
    )


@pytest.mark.parametrize("dataset", ["synthetic", "digits"])
def test_realised_equals_static_when_every_head_keeps_k_nonzero_channels(model, dataset):
    # A fresh layer's beta is 1, so every score is positive: every head keeps k nonzero channels.
    for _, layer in dgc_layers(model):
        layer.saliency_generator.beta.data.fill_(1.0)
        layer.saliency_generator.expand.data.clamp_(min=0)
    bundle = _data(dataset)
    report = evaluate(model, bundle.val, batch_size=32, input_size=(3, 32, 32))
    assert report.samples == len(bundle.val) and 0 <= report.top1 <= 100 and report.top5 is not None
    assert report.static_macs == count_macs(model, 32).total_macs
    assert report.realised_mean == pytest.approx(report.static_macs)
    assert all(
        row.nonzero_kept_fraction == 1.0 and row.realised_mean == pytest.approx(row.static_macs)
        for row in report.layers
    )


def test_heads_with_zero_scores_cost_less(model):
    name, layer = dgc_layers(model)[3]
    saved = layer.saliency_generator.beta.data.clone(), layer.saliency_generator.expand.data.clone()
    layer.saliency_generator.beta.data.fill_(-100.0)  # every score of this layer is zero
    try:
        report = evaluate(model, _data("synthetic").val, batch_size=32, input_size=(3, 32, 32))
    finally:
        layer.saliency_generator.beta.data, layer.saliency_generator.expand.data = saved
    row = next(r for r in report.layers if r.name == name)
    saliency_only = 2 * layer.heads * layer.in_channels * layer.saliency_generator.hidden
    assert row.nonzero_kept_fraction == 0.0 and row.realised_mean == pytest.approx(saliency_only)
    assert report.realised_mean < report.static_macs


def test_eval_command_with_a_recipe_or_a_data_set_name(tmp_path, model):
    path = save(model, tmp_path / "m.safetensors", input_size=32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\ndata: {dataset: synthetic, synthetic_size: 20}\n")
    runner = CliRunner()
    shown = runner.invoke(app, ["eval", str(path), "--data", str(recipe)])
    assert shown.exit_code == 0, shown.output
    assert "20 samples, top-1" in shown.stdout and "MACs per sample: static 20.53 M, realised mean" in shown.stdout
    as_json = json.loads(runner.invoke(app, ["eval", str(path), "--data", "digits", "--json"]).stdout)
    assert as_json["samples"] == 360 and as_json["static_macs"] == 20529152
    assert {"p5", "p50", "p95"} == set(as_json["realised_percentiles"]) and len(as_json["layers"]) == 19
    for args, message in [
        (["--data", "mnist"], "--data 'mnist': Input should be 'cifar10'"),
        (["--data", "cifar10"], "--data 'cifar10': dataset cifar10 needs data.root"),
        (["--data", "cifar10", "--root", str(tmp_path)], "CIFAR10 not found"),
    ]:
        failed = runner.invoke(app, ["eval", str(path), *args])
        assert failed.exit_code == 2 and message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_evaluate_and_inspect_work_with_unit_scores(model):
    """Scores are read on the layer, not through the saliency generator (which unit scores bypass)."""
    from dgc_convert import dgc_mode
    from dgc_convert.measuring.gate_usage import channel_usage

    bundle = _data("synthetic")
    with dgc_mode(model, unit_scores=True):
        report = evaluate(model, bundle.val, batch_size=32, input_size=(3, 32, 32))
        usage = channel_usage(model, bundle.val, batch_size=32)
    assert report.samples == len(bundle.val)
    # Every score is 1: every head keeps k nonzero channels, realised MACs equal the static count.
    assert report.realised_mean == pytest.approx(report.static_macs)
    # Equal scores go to the lowest channels, for every sample.
    first = usage[0]
    assert bool((first.frequency[:, : first.kept] == 1).all()) and bool((first.frequency[:, first.kept :] == 0).all())


class _Fixed(torch.nn.Module):
    """Returns the same logits for every batch."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def test_non_finite_outputs_are_counted_and_are_misses():
    from dgc_convert.measuring.evaluate import score

    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 0.0, 0.0], [0.0, inf, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 0])
    scores = score(_Fixed(logits), [(torch.zeros(4, 1), labels)])
    # topk puts NaN and inf first: without the check the first two would be top-1 hits.
    assert scores.nonfinite == 2 and scores.top1 == 1 and scores.count == 4
    assert not math.isfinite(scores.loss_sum)


def test_eval_command_warns_about_non_finite_outputs(tmp_path):
    torch.manual_seed(0)
    broken = create_model("resnet18", num_classes=10)
    convert(broken, zeta=0.5)
    with torch.no_grad():
        broken.fc.bias[3] = float("nan")  # every sample's logits hold a NaN
    path = save(broken.eval(), tmp_path / "nan.safetensors", input_size=32)
    runner = CliRunner()
    shown = runner.invoke(app, ["eval", str(path), "--data", "synthetic"])
    assert shown.exit_code == 0, shown.output
    samples = int(shown.stdout.split(" samples, top-1")[0].split()[-1])
    assert shown.stderr == (
        f"warning: {samples} of {samples} samples gave non-finite outputs (NaN/inf logits); "
        "accuracy counts them as wrong and the loss is nan\n"
    )
    assert "top-1 0.00%" in shown.stdout
    as_json = runner.invoke(app, ["eval", str(path), "--data", "digits", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["nonfinite_samples"] == 360
    assert as_json.stderr.startswith("warning: 360 of 360 samples gave non-finite outputs")


def test_finite_outputs_give_no_warning(tmp_path, model):
    report = evaluate(model, _data("synthetic").val, batch_size=32, input_size=(3, 32, 32))
    assert report.nonfinite_samples == 0 and report.to_dict()["nonfinite_samples"] == 0
