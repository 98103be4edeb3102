"""Checkpoints: safetensors + JSON, atomic replacement, integrity checks, no pickle."""

import json
import random

import pytest
import torch
from torch import nn

from dgc_convert import DGCConv2d
from dgc_convert.files.checkpoint_dirs import find_checkpoint
from dgc_convert.training.checkpoint import (
    CheckpointError,
    RunState,
    flatten_tensors,
    load_optimizer_state,
    read_checkpoint,
    save_checkpoint,
    unflatten_tensors,
)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), DGCConv2d(16, 8, 3, heads=2, zeta=0.5))


def test_flatten_round_trip_keeps_tensors_tuples_and_odd_floats():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    tree = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "inf": float("inf"), "none": None}
    skeleton, tensors = flatten_tensors(tree)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = unflatten_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert isinstance(back["python"], tuple) and back["python"] == random.getstate()
    assert back["inf"] == float("inf") and back["none"] is None
    state = back["optimizer"]["state"]
    for key, value in optimizer.state_dict()["state"].items():
        assert torch.equal(state[str(key)]["momentum_buffer"], value["momentum_buffer"])


def test_save_and_read_back(tmp_path):
    model = small_model()
    model[2].set_zeta_t(0.25)
    save_checkpoint(
        tmp_path / "last",
        model=model,
        state={"recipe": {"a": 1}, "epochs_completed": 3},
        training_state={"rng": torch.get_rng_state()},
    )
    checkpoint = read_checkpoint(tmp_path / "last")
    assert checkpoint.state["epochs_completed"] == 3
    fresh = small_model()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    checkpoint.load_weights(fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh[2].kept_channels == model[2].kept_channels  # zeta_t travels with the weights
    assert torch.equal(checkpoint.training_state()["rng"], torch.get_rng_state())


def test_replacing_a_checkpoint_leaves_no_temporary_files(tmp_path):
    model = small_model()
    for epoch in range(3):
        save_checkpoint(tmp_path / "last", model=model, state={"epochs_completed": epoch})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert read_checkpoint(tmp_path / "last").state["epochs_completed"] == 2


def test_a_save_cut_between_renames_still_finds_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 1})
    (tmp_path / "last").rename(tmp_path / ".last.old")  # as if killed between the two renames
    assert find_checkpoint(tmp_path / "last") == tmp_path / ".last.old"
    assert read_checkpoint(tmp_path / "last").state["epochs_completed"] == 1


def test_files_from_different_saves_are_refused(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path / "a", model=model, state={})
    save_checkpoint(tmp_path / "b", model=model, state={})
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="different save"):
        read_checkpoint(tmp_path / "a").load_weights(small_model())


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    save_checkpoint(tmp_path / "last", model=small_model(), state={})
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        read_checkpoint(tmp_path / "last").load_weights(other)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        read_checkpoint(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "state.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a dgc-convert checkpoint"):
        read_checkpoint(tmp_path / "x")


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path):
    save_checkpoint(tmp_path / "last", model=small_model(), state={})
    # A pickle that would run code if loaded with torch.load(weights_only=False).
    torch.save({"weight": torch.zeros(1)}, tmp_path / "last" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "last").load_weights(small_model())


def run_state(**changes):
    values = dict(
        status="running",
        recipe={"model": {"name": "resnet18"}, "train": {"lr": 0.02}},
        epochs_completed=1,
        iteration=14,
        epoch_iteration=2,
        iterations_per_epoch=12,
        total_iterations=24,
        progress=14 / 24,
        zeta_fraction=0.4,
        zeta_t={"layer1.0.conv1": 0.2, "layer1.0.conv2": 0.2},
        image_size=32,
        num_classes=10,
        world_size=1,
        best_top1=None,
        metrics={"epoch": 1, "val_top1": 12.5},
        wall_seconds=3.25,
    )
    values.update(changes)
    return RunState(**values)


def test_run_state_json_round_trip_through_a_checkpoint(tmp_path):
    state = run_state()
    assert RunState.from_json(json.loads(json.dumps(state.to_json()))) == state
    save_checkpoint(tmp_path / "last", model=small_model(), state=state, training_state={"x": torch.zeros(1)})
    checkpoint = read_checkpoint(tmp_path / "last")
    assert checkpoint.state["epoch_iteration"] == 2  # the plain keys of state.json, as before
    assert checkpoint.run_state() == state  # the file's own keys (format, id, training_state) are skipped


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("iteration", "14", "'iteration' should be a count"),
        ("epochs_completed", True, "'epochs_completed' should be a count"),
        ("epoch_iteration", -1, "'epoch_iteration' should be a count"),
        ("zeta_t", {"conv": "half"}, "'zeta_t' should be a JSON object of layer names to numbers"),
        ("best_top1", [1], "'best_top1' should be a number or null"),
        ("status", "paused", "'status' should be one of running, interrupted, finished, best"),
        ("metrics", 3, "'metrics' should be a JSON object or null"),
    ],
)
def test_a_malformed_run_state_is_refused_in_one_line_naming_file_and_key(tmp_path, key, value, expected):
    save_checkpoint(tmp_path / "last", model=small_model(), state=run_state())
    path = tmp_path / "last" / "state.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "last").run_state()
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_a_run_state_without_a_key_is_refused(tmp_path):
    data = run_state().to_json()
    del data["world_size"]
    with pytest.raises(CheckpointError, match=r"somewhere/state.json: the run state has no 'world_size'"):
        RunState.from_json(data, "somewhere/state.json")
    with pytest.raises(CheckpointError, match="should be a JSON object, found list"):
        RunState.from_json([], "state.json")


def test_optimizer_state_comes_back_with_integer_keys_and_resumes_the_same_steps(tmp_path):
    def stepped(optimizer, model, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.ones(2, 3, 8, 8)).square().mean().backward()
            optimizer.step()

    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stepped(optimizer, model, 2)
    save_checkpoint(tmp_path / "last", model=model, state={}, training_state={"optimizer": optimizer.state_dict()})
    checkpoint = read_checkpoint(tmp_path / "last")
    saved = checkpoint.training_state()["optimizer"]
    assert all(isinstance(key, str) for key in saved["state"])  # as JSON stores them

    fresh = small_model()
    checkpoint.load_weights(fresh)
    restored = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(restored, saved)
    assert set(restored.state_dict()["state"]) == set(optimizer.state_dict()["state"])  # integers again
    stepped(optimizer, model, 1)
    stepped(restored, fresh, 1)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_optimizer_state_that_does_not_fit_is_refused_in_one_line(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"^x/training.safetensors: the optimizer state does not fit") as error:
        load_optimizer_state(other, optimizer.state_dict(), "x/training.safetensors")
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_optimizer_state(optimizer, {"state": {"first": {}}, "param_groups": []})


# -- nothing lost: failed saves, leftovers of dead runs, deaths between renames -------


def test_a_save_that_fails_removes_its_temporary_directory_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import dgc_convert.training.checkpoint as checkpoint_module

    save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 1})

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "_write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert read_checkpoint(tmp_path / "last").state["epochs_completed"] == 1


def _dead_pid():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_leftovers_of_a_dead_save_are_swept_and_a_set_aside_checkpoint_put_back(tmp_path):
    import os

    from dgc_convert.training.checkpoint import sweep_checkpoints

    save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 1})
    dead = tmp_path / f".last.tmp-{_dead_pid()}"
    live = tmp_path / f".best.tmp-{os.getppid()}"  # a live process's save under way: kept
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / "last").rename(tmp_path / ".last.old")  # killed between the two renames
    assert sweep_checkpoints(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "last"]
    assert read_checkpoint(tmp_path / "last").state["epochs_completed"] == 1
    assert sweep_checkpoints(tmp_path, owned=True) == [live]  # under the run lock no other save is under way


def test_a_save_after_a_death_between_renames_never_drops_the_set_aside_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 1})
    (tmp_path / "last").rename(tmp_path / ".last.old")
    save_checkpoint(tmp_path / "last", model=small_model(), state={"epochs_completed": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert read_checkpoint(tmp_path / "last").state["epochs_completed"] == 2


def test_load_eval_and_resume_after_a_death_between_renames_and_the_next_run_sweeps(tmp_path):
    from typer.testing import CliRunner

    import dgc_convert
    from dgc_convert.cli import app
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.trainer import train

    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        "model: timm:test_resnet\n"
        "convert: {heads: 2, zeta: 0.5}\n"
        "train: {epochs: 2, batch_size: 16, lr: 0.02}\n"
        "data: {dataset: synthetic, synthetic_size: 16}\n"
        f"output: {{directory: {tmp_path / 'run'}}}\n"
    )
    run = tmp_path / "run"

    class StopAfterOneEpoch:
        def on_epoch_end(self, control, metrics):
            control.request_stop()

    assert train(load_recipe(recipe), callbacks=[StopAfterOneEpoch()]).status == "interrupted"
    expected = dgc_convert.load(run / "last").state_dict()
    # Killed between the renames: last/ set aside, the new one still in its temporary directory.
    (run / "last").rename(run / ".last.old")
    leftover = run / f".last.tmp-{_dead_pid()}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    model = dgc_convert.load(run / "last")  # the checkpoint --resume continues from
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    runner = CliRunner()
    evaluated = runner.invoke(app, ["eval", str(run / "last"), "--data", "synthetic", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert read_checkpoint(run / "last").directory == run / ".last.old"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".last.old", leftover.name]
    # Reading moved nothing; the next run sweeps the dead save's directory and puts last/ back.
    resumed = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after iteration" in resumed.stdout and "finished 2 epochs" in resumed.stdout
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert read_checkpoint(run / "last").state["epochs_completed"] == 2


def test_checkpoint_files_get_the_usual_mode(tmp_path):
    # safetensors writes 0600; every file of a checkpoint gets 0666 less the umask, as the JSON did.
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_checkpoint(
            tmp_path / "last",
            model=small_model(),
            state={"epochs_completed": 1},
            training_state={"step": torch.zeros(1)},
        )
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "last").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
