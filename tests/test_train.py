"""Training: the schedule drives every DGC layer, exact resume, Ctrl-C and NaN handling."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dgc_convert.conversion.surgery import dgc_layers
from dgc_convert.nn.layer import kept_channel_count
from dgc_convert.training.checkpoint import CheckpointError, read_checkpoint
from dgc_convert.training.recipe import recipe_from_dict
from dgc_convert.training.trainer import TrainingDiverged, train


def make_recipe(directory, *, train_settings=None, **sections):
    data = {
        "model": {"name": "resnet18"},
        "convert": {"heads": 4, "zeta": 0.5},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.02, "deterministic": True, **(train_settings or {})},
        "data": {"dataset": "synthetic", "synthetic_size": 48, "image_size": 32, "augmentation": "crop_flip"},
        "output": {"directory": str(directory)},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return recipe_from_dict(data)


def weights(directory):
    return load_file(str(directory / "last" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class StopAt:
    """Callback: ask for a stop (as Ctrl-C would) at an iteration or after an epoch."""

    def __init__(self, iteration=None, epoch=None, use_signal=False):
        self.iteration, self.epoch, self.use_signal = iteration, epoch, use_signal

    def on_iteration_end(self, control, iteration):
        if iteration == self.iteration:
            if self.use_signal:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                control.request_stop()

    def on_epoch_end(self, control, metrics):
        if metrics.epoch == self.epoch:
            control.request_stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-epoch run (12 iterations per epoch) the resumed runs must match."""
    directory = tmp_path_factory.mktemp("reference")
    result = train(make_recipe(directory))
    return directory, result


def test_a_short_run_ends_at_the_target_zeta_with_every_layer_keeping_k(reference):
    directory, result = reference
    assert result.status == "finished" and result.epochs_completed == 2 and result.iteration == 24
    layers = dgc_layers(result.model)
    assert len(layers) == 19
    x = torch.randn(3, 3, 32, 32)
    captured = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, n=name: captured.__setitem__(n, args[0]))
        for name, layer in layers
    ]
    result.model.eval()
    with torch.no_grad():
        result.model(x)
    for hook in hooks:
        hook.remove()
    for name, layer in layers:
        assert layer.zeta_t.item() == 0.5, name
        k = kept_channel_count(layer.in_channels, 0.5)
        assert layer.kept_channels == k
        mask = layer.gates(captured[name]).mask
        assert (mask.sum(dim=2) == k).all(), name  # exactly k channels per head and sample
    state = read_checkpoint(directory / "last").state
    assert state["status"] == "finished" and set(state["zeta_t"].values()) == {0.5}


def test_metrics_follow_the_schedule(reference):
    directory, _ = reference
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    first, last = rows
    assert 0 < first["zeta_t"] < last["zeta_t"] == 0.5
    assert last["macs"] < first["macs"] < first["dense_macs"]
    assert last["lr"] < first["lr"] < 0.02
    assert last["val_top5"] is not None and 0 <= last["val_top1"] <= 100
    assert (directory / "best" / "model.safetensors").is_file()  # only epoch 2 is at the target
    assert read_checkpoint(directory / "best").state["metrics"]["epoch"] == 2
    assert (directory / "recipe.yaml").is_file()


def test_resume_after_the_first_epoch_gives_exactly_the_uninterrupted_weights(reference, tmp_path):
    ref_dir, _ = reference
    recipe = make_recipe(tmp_path)
    stopped = train(recipe, callbacks=[StopAt(epoch=1)])
    assert stopped.status == "interrupted" and stopped.epochs_completed == 1
    assert read_checkpoint(tmp_path / "last").state["epoch_iteration"] == 0
    resumed = train(recipe, resume=True)
    assert resumed.status == "finished" and resumed.iteration == 24
    assert_same_weights(weights(tmp_path), weights(ref_dir))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_ctrl_c_mid_epoch_writes_a_checkpoint_and_resume_is_exact(reference, tmp_path):
    ref_dir, _ = reference
    recipe = make_recipe(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    stopped = train(recipe, callbacks=[StopAt(iteration=15, use_signal=True)])
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored
    assert stopped.status == "interrupted"
    state = read_checkpoint(tmp_path / "last").state
    # Stops are agreed every 10 iterations of an epoch: epoch 2, iteration 10 of 12.
    assert (state["epochs_completed"], state["epoch_iteration"], state["iteration"]) == (1, 10, 22)
    assert train(recipe, resume=True).status == "finished"
    assert_same_weights(weights(tmp_path), weights(ref_dir))


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    class DoubleInterrupt:
        def on_iteration_end(self, control, iteration):
            if iteration == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(make_recipe(tmp_path, train_settings={"epochs": 1}), callbacks=[DoubleInterrupt()])
    assert not (tmp_path / "last").exists()


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison:
        def on_iteration_end(self, control, iteration):
            if iteration == 14:  # in epoch 2, after epoch 1's checkpoint
                with torch.no_grad():
                    next(control.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged) as error:
        train(make_recipe(tmp_path), callbacks=[Poison()])
    message = str(error.value)
    assert "non-finite" in message and "last good checkpoint" in message and "\n" not in message
    state = read_checkpoint(tmp_path / "last").state
    assert state["epochs_completed"] == 1
    assert all(torch.isfinite(t).all() for t in weights(tmp_path).values() if t.is_floating_point())


def test_a_finished_run_is_not_overwritten_and_resume_checks_the_recipe(reference, tmp_path):
    ref_dir, _ = reference
    with pytest.raises(CheckpointError, match="already holds a run's checkpoint; pass --resume"):
        train(make_recipe(ref_dir))
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's at train.lr \(0.02 there, 0.5 now\)"):
        train(make_recipe(ref_dir, train_settings={"lr": 0.5}), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(make_recipe(tmp_path / "empty"), resume=True)


def test_the_dense_baseline_trains_the_same_way(tmp_path):
    recipe = make_recipe(tmp_path, convert={"enabled": False}, train_settings={"epochs": 1, "batch_size": 16})
    result = train(recipe)
    assert result.status == "finished" and not dgc_layers(result.model)
    assert result.final.macs == result.final.dense_macs


def test_batch_larger_than_the_data(tmp_path):
    from dgc_convert.errors import DGCConvertError

    with pytest.raises(DGCConvertError, match="train.batch_size=64 is larger than the 48 training samples"):
        train(make_recipe(tmp_path, train_settings={"batch_size": 64}))


def test_a_dgc_g_run_learns_one_threshold_and_resumes_exactly(tmp_path):
    convert = {"gating": "network", "preact": True, "squeeze_rule": "authors"}
    full = train(make_recipe(tmp_path / "full", convert=convert))
    layers = dgc_layers(full.model)
    thresholds = {layer.threshold_value for _, layer in layers}
    assert len(thresholds) == 1 and thresholds.pop() > 0  # one T, learned, in every layer
    assert all(layer.norm is not None and layer.squeeze_rule == "authors" for _, layer in layers)
    recipe = make_recipe(tmp_path / "stopped", convert=convert)
    stopped = train(recipe, callbacks=[StopAt(iteration=15)])
    assert stopped.status == "interrupted"
    assert read_checkpoint(tmp_path / "stopped" / "last").state["epoch_iteration"] == 10  # mid-epoch
    assert train(recipe, resume=True).status == "finished"
    resumed = weights(tmp_path / "stopped")
    assert any(key.endswith(".threshold") for key in resumed)
    assert_same_weights(resumed, weights(tmp_path / "full"))


def test_a_resumed_run_keeps_the_layers_its_checkpoint_was_converted_with(reference, tmp_path, monkeypatch):
    """A run started by a version whose rules converted a layer that today's keep dense resumes
    with the saved conversion, exactly where it stopped."""
    import dgc_convert.conversion.build as build

    ref_dir, _ = reference
    recipe = make_recipe(tmp_path)
    train(recipe, callbacks=[StopAt(epoch=1)])
    convert_today = build.convert

    def stricter_rules(model, settings, **kwargs):  # today's rules keep layer1.0.conv1 dense
        return convert_today(model, settings.model_copy(update={"exclude": ["layer1.0.conv1"]}), **kwargs)

    monkeypatch.setattr(build, "convert", stricter_rules)
    resumed = train(recipe, resume=True)
    assert resumed.status == "finished"
    assert "layer1.0.conv1" in dict(dgc_layers(resumed.model)) and len(dgc_layers(resumed.model)) == 19
    assert_same_weights(weights(tmp_path), weights(ref_dir))
    # a fresh run follows today's rules
    fresh = train(make_recipe(tmp_path / "fresh", train_settings={"epochs": 1}))
    assert "layer1.0.conv1" not in dict(dgc_layers(fresh.model))
