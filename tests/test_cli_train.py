"""`dgc-convert train`, `recipe validate` and `recipe show` from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgc_convert.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def write_recipe(tmp_path, epochs=1, size=32, batch=16, workers=0):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "model: resnet18\n"
        "convert: {heads: 4, zeta: 0.5}\n"
        f"train: {{epochs: {epochs}, batch_size: {batch}, lr: 0.02, num_workers: {workers}}}\n"
        f"data: {{dataset: synthetic, synthetic_size: {size}}}\n"
        f"output: {{directory: {tmp_path / 'run'}}}\n"
    )
    return path


def test_train_prints_plain_lines_when_not_a_terminal_and_resume_refuses_nothing_new(tmp_path):
    recipe = write_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "training resnet18 (19 DGC layers) on synthetic" in out
    assert "epoch 1/1 ramp" in out and "zeta_t 0.500" in out and "img/s" in out
    assert "finished 1 epoch in" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["zeta_t"] == 0.5
    again = runner.invoke(app, ["train", str(recipe)])
    assert again.exit_code == 2 and "pass --resume to continue it" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_set_overrides_and_bad_values_from_the_command_line(tmp_path):
    recipe = write_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", "train.epochs=0"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: {recipe} (with --set train.epochs=0): train.epochs=0: Input should be greater than or equal to 1"
    )


def test_recipe_validate_and_show(tmp_path):
    ok = runner.invoke(app, ["recipe", "validate", str(ROOT / "recipes" / "digits.yaml")])
    assert (
        ok.exit_code == 0 and "OK (resnet18 from torchvision, DGC heads 4, zeta 0.5, 15 epochs on digits)" in ok.stdout
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet18\ntrain: {epochs: many}\n")
    failed = runner.invoke(app, ["recipe", "validate", str(bad)])
    assert failed.exit_code == 2 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        f"error: {bad}: train.epochs='many': Input should be a valid integer, unable to parse string as an integer"
    ]
    shown = runner.invoke(app, ["recipe", "show", str(ROOT / "recipes" / "digits.yaml")])
    assert shown.exit_code == 0
    assert "22 iterations per epoch" in shown.stdout and "330 in all" in shown.stdout
    assert any(line.split()[:3] == ["warmup", "1-2", "0-27"] for line in shown.stdout.splitlines())
    assert any(line.split()[:3] == ["finetune", "12-15", "248-329"] for line in shown.stdout.splitlines())
    as_json = json.loads(runner.invoke(app, ["recipe", "show", str(ROOT / "recipes" / "digits.yaml"), "--json"]).stdout)
    assert as_json["iterations_per_epoch"] == 22 and as_json["recipe"]["train"]["warmup_fraction"] == pytest.approx(
        1 / 12
    )
    assert [s["stage"] for s in as_json["stages"]] == ["warmup", "ramp", "finetune"]


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resume_finishes(tmp_path):
    # As from a terminal: Ctrl-C reaches the whole process group, data-loading workers included.
    recipe = write_recipe(tmp_path, epochs=8, size=64, batch=8, workers=1)
    process = subprocess.Popen(
        [sys.executable, "-m", "dgc_convert.cli", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (
        not (metrics.is_file() and metrics.read_text().strip())
        and time.monotonic() < deadline
        and process.poll() is None
    ):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "checkpoint written to" in stderr and f"dgc-convert train {recipe} --resume" in stderr
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["status"] == "interrupted" and 1 <= state["epochs_completed"] < 8
    resumed = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after iteration" in resumed.stdout and "finished 8 epochs" in resumed.stdout


def test_the_training_log_says_network_gated_macs_are_expected(tmp_path):
    from rich.console import Console

    from dgc_convert.training.events import EpochMetrics, RunInfo
    from dgc_convert.training.progress_bars import TrainProgress

    def log(expected: bool) -> str:
        console = Console(record=True, width=300, force_terminal=False)
        progress = TrainProgress(console, bars=False)
        info = dict(model="resnet18", dataset="synthetic", output_dir=tmp_path, image_size=32, num_classes=10)
        info.update(train_samples=32, val_samples=32, epochs=1, iterations_per_epoch=2, start_epoch=0)
        info.update(start_iteration=0, world_size=1, device="cpu", converted_layers=19, dense_macs=2_000_000)
        progress.on_start(RunInfo(**info, target_macs=1_000_000, stages=[], macs_expected=expected))
        row = {name: 0 for name in EpochMetrics.__dataclass_fields__}
        row.update(epoch=1, stage="finetune", val_top5=None, macs=1_000_000, dense_macs=2_000_000)
        progress.on_epoch(EpochMetrics(**row))
        return console.export_text()

    text = log(True)
    assert "expected at target 1.00 M" in text and "MACs 1.00 M expected (-50%)" in text
    assert "expected" not in log(False)


def test_recipe_validate_names_gating_preact_and_squeeze_rule(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("model: resnet18\nconvert: {gating: network, preact: true, squeeze_rule: authors}\n")
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "DGC heads 4, zeta 0.5, network gating, pre-activation, squeeze rule authors, 1 epochs" in result.stdout


# -- start from trained weights; recipe validate resolves the model -----------------


def _one_line_error(result) -> str:
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_recipe_validate_resolves_the_model_name_without_building_it(tmp_path):
    path = tmp_path / "typo.yaml"  # one line, close matches, and no model is built
    path.write_text("model: resnet181\n")
    message = _one_line_error(runner.invoke(app, ["recipe", "validate", str(path)]))
    assert message.startswith(
        f"error: {path}: model.name: unknown model 'resnet181' in timm or torchvision; did you mean"
    )
    assert "resnet18" in message
    assert "did you mean" in _one_line_error(runner.invoke(app, ["recipe", "show", str(path)]))
    path.write_text("model: {name: resnet18, source: timm}\n")
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 0 and "OK (resnet18 from timm, DGC heads 4" in result.stdout
    shown = runner.invoke(app, ["recipe", "show", str(path), "--json"])
    assert json.loads(shown.stdout)["library"] == "timm"


def test_recipe_validate_checks_the_checkpoint_file_exists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name: resnet18, checkpoint: {tmp_path / 'gone.pth'}}}\n")
    message = _one_line_error(runner.invoke(app, ["recipe", "validate", str(path)]))
    assert message == f"error: {path}: model.checkpoint: {tmp_path / 'gone.pth'}: no such file"
    (tmp_path / "gone.pth").write_text("validate does not read it")
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 0 and f"OK (resnet18 from torchvision, starting from {tmp_path / 'gone.pth'}, DGC" in (
        result.stdout
    )
    path.write_text(f"model: {{name: resnet18, pretrained: true, checkpoint: {tmp_path / 'gone.pth'}}}\n")
    message = _one_line_error(runner.invoke(app, ["recipe", "validate", str(path)]))
    assert "pretrained and checkpoint are both set" in message


def write_small_recipe(tmp_path, epochs=1):
    """A recipe on timm's tiny test ResNet: a second or so per run, checkpoints included."""
    path = tmp_path / "small.yaml"
    path.write_text(
        "model: timm:test_resnet\n"
        "convert: {heads: 2, zeta: 0.5}\n"
        f"train: {{epochs: {epochs}, batch_size: 16, lr: 0.02}}\n"
        "data: {dataset: synthetic, synthetic_size: 16}\n"
        f"output: {{directory: {tmp_path / 'run'}}}\n"
    )
    return path


def test_a_missing_checkpoint_fails_at_train_start(tmp_path):
    recipe = write_recipe(tmp_path)
    message = _one_line_error(runner.invoke(app, ["train", str(recipe), "--checkpoint", str(tmp_path / "gone.pth")]))
    assert message == f"error: {tmp_path / 'gone.pth'}: no such file"
    assert not (tmp_path / "run" / "last").exists()


def test_train_starts_from_the_checkpoint_and_resume_does_not_read_it_again(tmp_path, monkeypatch):
    import torch

    import dgc_convert.conversion.build as build
    from dgc_convert import create_model
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.trainer import train

    torch.manual_seed(5)
    trained = create_model("timm:test_resnet", num_classes=10).state_dict()
    weights = tmp_path / "trained.pt"
    torch.save({"model": trained}, weights)
    read: list[str] = []
    load_dense_weights = build.load_dense_weights

    def recording(model, path):
        read.append(str(path))
        source = load_dense_weights(model, path)
        read.append(str(all(torch.equal(model.state_dict()[key], value) for key, value in trained.items())))
        return source

    monkeypatch.setattr(build, "load_dense_weights", recording)

    class StopAfterFirstEpoch:
        def on_epoch_end(self, control, metrics):
            control.request_stop()

    recipe = write_small_recipe(tmp_path, epochs=2)
    # --checkpoint F is --set model.checkpoint=F: what the first run was started with.
    stopped = train(load_recipe(recipe, [f"model.checkpoint={weights}"]), callbacks=[StopAfterFirstEpoch()])
    assert stopped.status == "interrupted" and read == [str(weights), "True"]
    weights.unlink()  # resuming restores the run's own weights: the file is not needed any more
    read.clear()
    resumed = runner.invoke(app, ["train", str(recipe), "--checkpoint", str(weights), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after iteration" in resumed.stdout and read == []
    refused = runner.invoke(app, ["train", str(recipe), "--resume"])  # the recipe must be the same
    assert refused.exit_code == 2 and "differs from the checkpoint's at model.checkpoint" in refused.stderr


def test_recipe_pretrained_reaches_the_library_in_train(tmp_path, library_calls):
    recipe = write_small_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", "model.pretrained=true"])
    assert result.exit_code == 0, result.output
    assert library_calls == [("timm", True)]


def test_tensorboard_without_its_package_fails_at_train_start(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    recipe = write_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", "train.tensorboard=true"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.strip().splitlines() == [
        'error: train.tensorboard needs the tensorboard package: pip install "dgc-convert[tensorboard]"'
    ]
    assert not (tmp_path / "run").exists()


def test_training_at_a_size_whose_activations_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import dgc_convert.training.setup as train_setup

    monkeypatch.setattr(train_setup, "available_memory", lambda device: 1 << 30)
    recipe = write_small_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", "data.image_size=1024"])
    message = _one_line_error(result)
    assert message.startswith("error: training at 1024x1024 with batch 16 on cpu would keep at least ")
    assert message.endswith(
        " of activations and 1.0 GiB is available; lower the image size (data.image_size) or train.batch_size"
    )
    assert not (tmp_path / "run").exists()  # refused before it started: not even its directory is left
