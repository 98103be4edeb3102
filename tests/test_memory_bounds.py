"""Work that could not fit in memory is refused in one line before anything big is allocated."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from dgc_convert import count_macs
from dgc_convert.cli import app
from dgc_convert.errors import SettingsError
from dgc_convert.measuring.evaluate import evaluate
from dgc_convert.measuring.gate_usage import channel_usage
from dgc_convert.measuring.macs import LIVE_ACTIVATIONS
from dgc_convert.training.data import build_data
from dgc_convert.training.recipe import DataSection


def test_forward_memory_is_the_input_and_three_of_the_largest_activation():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    report = count_macs(model, (3, 16, 16))
    image, largest = 3 * 16 * 16 * 4, 8 * 16 * 16 * 4
    assert report.forward_memory(5) == 5 * (image + LIVE_ACTIVATIONS * largest)


def test_bench_refuses_a_batch_that_cannot_fit_before_allocating_it():
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["bench", "resnet18", "--batch-size", "100000"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: timing in batches of 100000 at 224x224 would hold about ")
    assert result.stderr.endswith(" is available; lower the batch size (--batch-size)\n")
    assert time.perf_counter() - start < 30


@pytest.fixture(scope="module")
def model(late_dgc_resnet18):
    return late_dgc_resnet18


def test_evaluate_and_channel_usage_refuse_batches_that_cannot_fit(model, monkeypatch):
    import dgc_convert.measuring.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 1 << 20)  # 1 MiB
    held_out = build_data(
        DataSection(dataset="synthetic", synthetic_size=40, augmentation="none"), image_size=32, num_classes=10, seed=0
    ).val
    with pytest.raises(
        SettingsError, match=r"^evaluating in batches of 40 at 32x32 would hold about .* of activations"
    ):
        evaluate(model, held_out, batch_size=64)  # capped at the 40 samples there are
    with pytest.raises(SettingsError, match=r"^recording the gates in batches of 16 at 32x32 would hold about"):
        channel_usage(model, held_out, batch_size=16)
