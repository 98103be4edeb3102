"""Checkpoints: safetensors + JSON, atomic replacement, integrity checks, no pickle."""

import json
import random

import pytest
import torch
from torch import nn

from dgc_convert import DGCConv2d
from dgc_convert.checkpoint import (
    CheckpointError, find_checkpoint, flatten_tensors, read_checkpoint, save_checkpoint, unflatten_tensors,
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
    save_checkpoint(tmp_path / "last", model=model, state={"recipe": {"a": 1}, "epochs_completed": 3},
                    training_state={"rng": torch.get_rng_state()})
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
