"""Start from trained weights: every accepted file layout loads exactly, every bad file is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dgc_convert import LoadError, convert, create_model, save
from dgc_convert.conversion.build import create_dense
from dgc_convert.conversion.dense_weights import WEIGHTS_SUFFIXES, WeightsSource, find_weights_file, load_dense_weights
from dgc_convert.conversion.settings import model_settings
from dgc_convert.errors import WeightsFileError
from dgc_convert.training.checkpoint import save_checkpoint

MODEL = "timm:test_resnet"  # timm's tiny test ResNet: 92 tensors, 0.4 M parameters


def fresh() -> nn.Module:
    return create_model(MODEL, num_classes=10)


@pytest.fixture(scope="module")
def trained() -> dict[str, Tensor]:
    """Weights unlike a fresh model's, standing in for a trained one."""
    torch.manual_seed(1)
    return {key: value.clone() for key, value in fresh().state_dict().items()}


def assert_loaded(model: nn.Module, weights: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def refused(path: Path, model: nn.Module | None = None) -> str:
    """The one-line message loading ``path`` raises; the model stays as it was."""
    model = model if model is not None else fresh()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(WeightsFileError) as caught:
        load_dense_weights(model, path)
    assert_loaded(model, before)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


# -- every accepted layout ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, wrap, entry",
    [
        ("plain.safetensors", None, None),
        ("plain.pth", lambda sd: sd, None),
        ("wrapped.pt", lambda sd: {"state_dict": sd, "epoch": 90, "arch": "test_resnet"}, "state_dict"),
        ("wrapped.bin", lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, "model"),
    ],
)
def test_each_format_loads_the_exact_weights(tmp_path, trained, name, wrap, entry):
    path = tmp_path / name
    if wrap is None:
        save_file(trained, str(path))
    else:
        torch.save(wrap(trained), path)
    model = fresh()
    source = load_dense_weights(model, path)
    assert_loaded(model, trained)
    assert source == WeightsSource(path, entry, (), len(trained))


def test_wrapper_prefixes_are_stripped_and_the_moving_average_wins(tmp_path, trained):
    raw = {key: torch.zeros_like(value) for key, value in trained.items()}
    path = tmp_path / "ddp_ema.pth"
    # timm's train.py layout: raw weights, and the EMA (wrapped as `module`) it evaluates and publishes.
    torch.save({"state_dict": raw, "state_dict_ema": {f"module.{k}": v for k, v in trained.items()}}, path)
    model = fresh()
    assert load_dense_weights(model, path).entry == "state_dict_ema"
    assert_loaded(model, trained)
    compiled_ddp = tmp_path / "compiled.safetensors"
    save_file({f"_orig_mod.module.{k}": v for k, v in trained.items()}, str(compiled_ddp))
    model = fresh()
    assert load_dense_weights(model, compiled_ddp).stripped == ("_orig_mod.", "module.")
    assert_loaded(model, trained)


def test_half_precision_weights_are_cast_and_an_old_file_may_lack_batch_counters(tmp_path, trained):
    old = {k: (v.half() if v.is_floating_point() else v) for k, v in trained.items()}
    old = {k: v for k, v in old.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_half.pth"
    torch.save(old, path)
    model = fresh()
    load_dense_weights(model, path)
    for key, value in old.items():
        assert torch.equal(model.state_dict()[key], value.to(model.state_dict()[key].dtype)), key


def test_our_own_dense_files_and_run_checkpoints_load(tmp_path, trained):
    dense = fresh()
    dense.load_state_dict(trained)
    saved = save(dense, tmp_path / "dense.safetensors")
    model = fresh()
    load_dense_weights(model, saved)
    assert_loaded(model, trained)
    # A dense training run's checkpoint directory (convert.enabled: false), as the trainer writes it.
    run = save_checkpoint(tmp_path / "run" / "last", model=dense, state={"epochs_completed": 1})
    model = fresh()
    assert load_dense_weights(model, run).file == run / "model.safetensors"
    assert_loaded(model, trained)


def test_the_recipe_model_section_loads_its_checkpoint_when_building(tmp_path, trained, monkeypatch):
    save_file(trained, str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)  # a relative path is relative to the working directory
    spec = model_settings(name=MODEL, num_classes=10, checkpoint="w.safetensors")
    assert_loaded(create_dense(spec), trained)
    assert not torch.equal(create_dense(spec, load_checkpoint=False).state_dict()["fc.weight"], trained["fc.weight"])


# -- every refusal: one line naming the file, the model untouched --------------------


class NotWeights:
    """A pickled object weights-only loading refuses."""


def test_pickled_objects_text_and_empty_files_are_refused(tmp_path, trained):
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": trained, "args": NotWeights()}, pickled)
    message = refused(pickled)
    assert "NotWeights" in message and "weights-only loading refuses" in message
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    assert "not a readable PyTorch checkpoint" in refused(text)
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not safetensors either")
    assert "not a readable safetensors file" in refused(fake)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    assert "holds no dict of weights (an empty dict" in refused(empty)


def test_missing_files_directories_and_unknown_suffixes(tmp_path, trained):
    assert refused(tmp_path / "nope.pth").endswith("nope.pth: no such file")
    (tmp_path / "run" / "last").mkdir(parents=True)
    message = refused(tmp_path / "run")
    assert "a directory without model.safetensors (a run's checkpoints are its last/ and best/" in message
    assert "a directory without model.safetensors" in refused(tmp_path / "run" / "last")
    odd = tmp_path / "weights.ckpt"
    torch.save(trained, odd)
    assert f"unknown weights file type '.ckpt'; expected {', '.join(WEIGHTS_SUFFIXES)}" in refused(odd)
    assert refused(tmp_path / "run" / "last" / "model.safetensors").endswith("no such file")
    (tmp_path / "run" / "last" / "model.safetensors").write_bytes(b"")  # existence only: nothing is read
    assert find_weights_file(tmp_path / "run" / "last") == tmp_path / "run" / "last" / "model.safetensors"


def test_missing_unexpected_and_misshapen_keys_are_named_with_counts(tmp_path, trained):
    state = dict(trained)
    for key in ("fc.weight", "fc.bias", "conv1.0.weight", "conv1.1.weight"):
        del state[key]
    state["head.weight"] = torch.zeros(10, 96)
    state["layer1.0.bn1.weight"] = torch.zeros(7)
    state["layer1.0.bn1.running_var"] = torch.ones(state["layer1.0.bn1.running_var"].shape, dtype=torch.int64)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    message = refused(path)
    assert message.startswith(f"{path}: does not fit timm test_resnet: ")
    assert "missing 4 keys (conv1.0.weight, conv1.1.weight, fc.weight, ...)" in message
    assert "unexpected 1 (head.weight)" in message
    assert "2 differ in shape or dtype (layer1.0.bn1.weight: file (7,), model (32,); " in message
    assert "layer1.0.bn1.running_var: file (32,) int64, model (32,) float32)" in message


def test_a_classifier_of_another_width_is_a_shape_mismatch(tmp_path, trained):
    path = tmp_path / "ten.safetensors"
    save_file(trained, str(path))
    message = refused(path, create_model(MODEL, num_classes=7))
    assert "2 differ in shape or dtype (fc.weight: file (10, 96), model (7, 96); fc.bias: file (10,), model (7,))" in (
        message
    )


def test_non_tensor_entries_are_refused(tmp_path, trained):
    path = tmp_path / "mixed.pth"
    torch.save({**trained, "epoch": 3}, path)
    assert "entry 'epoch' of its state_dict is a int, not a tensor" in refused(path)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {**trained, "meta": {"lr": 0.1}}}, nested)
    assert "entry 'meta' of its 'model' entry is a dict, not a tensor" in refused(nested)


def test_a_converted_model_is_refused_in_every_format(tmp_path):
    model = fresh()
    convert(model, heads=2)
    saved = save(model, tmp_path / "dgc.safetensors")
    message = refused(saved)
    assert "holds a converted DGC model (14 DGC layers in its metadata), not dense weights" in message
    assert "open it with dgc_convert.load or `dgc-convert eval`" in message
    pickled = tmp_path / "dgc.pth"
    torch.save({"state_dict": model.state_dict()}, pickled)
    assert "holds a converted DGC model (e.g. conv1.3.zeta_t)" in refused(pickled)


def test_a_file_we_saved_for_another_model_says_which(tmp_path):
    saved = save(create_model("resnet18", num_classes=10), tmp_path / "resnet18.safetensors")
    assert refused(saved).endswith("holds torchvision resnet18; the model here is timm test_resnet")


def test_the_error_is_a_load_error():
    assert issubclass(WeightsFileError, LoadError)
