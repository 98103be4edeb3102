"""save / load: one safetensors file, rebuilt by name, every failure one clear line, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dgc_convert import convert, create_model, dgc_layers, set_zeta
from dgc_convert.cli import app
from dgc_convert.conversion.saved_models import (
    LoadError,
    apply_saved_layouts,
    load,
    model_metadata,
    read_metadata,
    save,
)


def _round_trip(tmp_path, name, size, **settings):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    convert(model, **settings)
    set_zeta(model, fraction=0.6)  # a zeta_t between 0 and the target must survive
    model.eval()
    path = save(model, tmp_path / f"{name.replace(':', '_')}.safetensors", input_size=size)
    loaded = load(path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    saved = {n: layer.zeta_t.item() for n, layer in model.named_modules() if hasattr(layer, "zeta_t")}
    assert saved == {n: layer.zeta_t.item() for n, layer in loaded.named_modules() if hasattr(layer, "zeta_t")}
    assert loaded.dgc_model_info.input_size == (3, size, size) and loaded.dgc_model_info.num_classes == 7
    return path


@pytest.mark.parametrize(
    "name, size, settings",
    [
        ("resnet18", 32, {"zeta": 0.5, "overrides": {"layer4.*": {"zeta": 0.75, "heads": 2}}}),
        ("densenet121", 32, {"include": ["features.denseblock*.denselayer*.conv1"]}),
        ("timm:efficientnet_b0", 32, {"heads": 2, "min_channels": 24}),
    ],
)
def test_round_trip_gives_the_same_outputs(tmp_path, name, size, settings):
    path = _round_trip(tmp_path, name, size, **settings)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "dgc-convert-model/1" and metadata["torch_version"] == torch.__version__
    assert all(
        {"name", "heads", "squeeze_ratio", "zeta", "zeta_t", "layout"} <= set(layer)
        for layer in json.loads(metadata["conversion"])
    )
    # A new conversion is blocked, and loads blocked.
    assert {layer["layout"] for layer in json.loads(metadata["conversion"])} == {"blocked"}
    assert not any(layer.interleaved for _, layer in dgc_layers(load(path)))


def _interleaved_model(name="resnet18", size=32, **settings):
    """A model as dgc-convert built them before blocked ownership: every DGC layer interleaved."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    convert(model, **settings)
    for _, layer in dgc_layers(model):
        layer.interleaved = True
    model.train()
    with torch.no_grad():  # BatchNorm statistics worth keeping
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    set_zeta(model, fraction=0.6)
    return model.eval()


def _save_in_the_old_format(model, path, size):
    """What ``save`` wrote before blocked ownership: the same metadata, no "layout" in the conversion entries."""
    from safetensors.torch import save_model

    metadata = model_metadata(model, size)
    layers = json.loads(metadata["conversion"])
    assert {layer.pop("layout") for layer in layers} == {"interleaved"}
    metadata["conversion"] = json.dumps(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("target", ["old.safetensors", "checkpoint/model.safetensors"])
def test_a_file_saved_before_blocked_ownership_loads_interleaved_with_the_same_outputs(tmp_path, target):
    model = _interleaved_model()
    path = _save_in_the_old_format(model, tmp_path / target, 32)
    loaded = load(path.parent if target.startswith("checkpoint/") else path)
    assert len(dgc_layers(loaded)) == len(dgc_layers(model)) > 0
    assert all(layer.interleaved for _, layer in dgc_layers(loaded))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The same weights read as blocked layers compute something else: the layout is what keeps them right.
    for _, layer in dgc_layers(loaded):
        layer.interleaved = False
    with torch.no_grad():
        assert not torch.allclose(loaded(x), model(x))
    # Saved again, the file says so; loading it again gives the same outputs.
    for _, layer in dgc_layers(loaded):
        layer.interleaved = True
    again = save(loaded, tmp_path / "again.safetensors")
    assert {layer["layout"] for layer in json.loads(read_metadata(again)["conversion"])} == {"interleaved"}
    with torch.no_grad():
        torch.testing.assert_close(load(again)(x), model(x), rtol=0, atol=0)


def test_an_interleaved_file_computes_as_a_blocked_layer_plus_one_relabelling(tmp_path):
    """Each layer of a file written as ``save`` wrote interleaved layers (dense rows, head i owning
    rows i::H, "layout": "interleaved") equals, at atol 0 in every eval computation, a blocked layer
    holding the same filters in blocked order followed by one gather of its output channels."""
    from safetensors.torch import save_model

    from dgc_convert import DGCConv2d

    model = _interleaved_model()
    metadata = model_metadata(model, 32)
    assert {layer["layout"] for layer in json.loads(metadata["conversion"])} == {"interleaved"}
    save_model(model, str(tmp_path / "interleaved.safetensors"), metadata=metadata)
    tensors = load_file(str(tmp_path / "interleaved.safetensors"))
    loaded = load(tmp_path / "interleaved.safetensors")
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
        for name, layer in dgc_layers(loaded)
    ]
    with torch.no_grad():
        loaded(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for name, layer in dgc_layers(loaded)[:4]:
        heads, out_channels = layer.heads, layer.out_channels
        per_head = out_channels // heads
        blocked = DGCConv2d(
            layer.in_channels, out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            bias=layer.bias is not None, heads=heads, squeeze_ratio=layer.squeeze_ratio, zeta=layer.zeta,
        )  # fmt: skip
        state = {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + ".")}
        # Blocked row h*n + j is the file's row j*H + h; dense channel j*H + h is blocked channel h*n + j.
        rows = torch.tensor([j * heads + h for h in range(heads) for j in range(per_head)])
        order = torch.tensor([h * per_head + j for j in range(per_head) for h in range(heads)])
        state["weight"] = state["weight"][rows]
        if "bias" in state:
            state["bias"] = state["bias"][rows]
        blocked.load_state_dict(state)
        blocked.eval()
        for algorithm in ("auto", "masked", "gather_conv", "gather_bmm", "stacked", "export"):
            layer.inference_algorithm = blocked.inference_algorithm = algorithm
            with torch.no_grad():
                want = blocked(inputs[name])[:, order]
                torch.testing.assert_close(layer(inputs[name]), want, rtol=0, atol=0, msg=f"{name} {algorithm}")


def test_saved_layouts_apply_to_a_model_built_from_settings(tmp_path):
    """A trainer resuming from an old checkpoint builds blocked layers from its recipe; the file's layouts fix that."""
    from safetensors.torch import load_model

    model = _interleaved_model(zeta=0.5)
    path = _save_in_the_old_format(model, tmp_path / "old.safetensors", 32)
    rebuilt = create_model("resnet18", num_classes=7)
    convert(rebuilt, zeta=0.5)
    apply_saved_layouts(rebuilt, read_metadata(path))
    load_model(rebuilt, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(LoadError, match="not the model's"):
        apply_saved_layouts(create_model("resnet18", num_classes=7), read_metadata(path))


def test_trainer_checkpoints_load(tmp_path):
    from dgc_convert.training.recipe import recipe_from_dict
    from dgc_convert.training.trainer import train

    result = train(
        recipe_from_dict(
            {
                "model": {"name": "resnet18"},
                "convert": {"zeta": 0.5},
                "train": {"epochs": 1, "batch_size": 16, "lr": 0.02},
                "data": {"dataset": "synthetic", "synthetic_size": 32, "image_size": 32, "augmentation": "none"},
                "output": {"directory": str(tmp_path / "run")},
            }
        )
    )
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(x)
        for target in (tmp_path / "run" / "best", tmp_path / "run" / "last" / "model.safetensors"):
            model = load(target)
            assert model.dgc_model_info.input_size == (3, 32, 32)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    convert(model)
    return save(model, tmp_path_factory.mktemp("saved") / "r18.safetensors", input_size=32)


def _rewrite(source, target, **changes):
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata.update(changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


def test_each_load_error_is_one_clear_line(tmp_path, saved):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    (tmp_path / "empty_dir").mkdir()
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    cases = [
        (tmp_path / "nope.safetensors", "no such file"),
        (tmp_path / "empty_dir", "a directory without model.safetensors"),
        (junk, "not a readable safetensors file"),
        (truncated, "not a readable safetensors file"),
        (plain, "no dgc-convert model metadata"),
        (_rewrite(saved, tmp_path / "newer.safetensors", format="dgc-convert-model/9"), "newer than this dgc-convert"),
        (
            _rewrite(saved, tmp_path / "unknown.safetensors", model="resnet_from_the_future"),
            "cannot rebuild torchvision model 'resnet_from_the_future'",
        ),
        (
            _rewrite(saved, tmp_path / "classes.safetensors", num_classes="5"),
            "tensors do not match the rebuilt resnet18",
        ),
        (
            _rewrite(saved, tmp_path / "layers.safetensors", conversion=json.dumps([])),
            "tensors do not match the rebuilt resnet18",
        ),
        (_rewrite(saved, tmp_path / "nojson.safetensors", conversion="[oops"), "metadata field 'conversion'"),
        (
            _rewrite(
                saved,
                tmp_path / "layout.safetensors",
                conversion=json.dumps(
                    [{"name": "layer1.0.conv1", "heads": 4, "squeeze_ratio": 16, "zeta": 0.5, "layout": "diagonal"}]
                ),
            ),
            "unknown layout 'diagonal'",
        ),
    ]
    runner = CliRunner()
    for path, message in cases:
        with pytest.raises(LoadError) as caught:
            load(path)
        text = str(caught.value)
        assert message in text and str(path.name) in text and "\n" not in text, (path.name, text)
        # The same from the command line: one line on stderr, exit 2, nothing on stdout.
        result = runner.invoke(app, ["eval", str(path), "--data", "synthetic"])
        assert result.exit_code == 2 and result.stdout == "", (path.name, result.output)
        assert result.stderr.strip().splitlines() == [f"error: {text}"]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    _Payload.marker = marker
    evil = tmp_path / "model.safetensors"
    torch.save({"weights": payload}, evil)  # a pickle, as torch.save writes
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load(evil)
    assert not marker.exists()
    result = CliRunner().invoke(app, ["bench", str(evil)])
    assert result.exit_code == 2 and not marker.exists()
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_save_then_bench_the_file(tmp_path):
    runner = CliRunner()
    target = tmp_path / "r18.safetensors"
    converted = runner.invoke(app, ["resnet18", "--input-size", "32", "--zeta", "0.75", "--save", str(target)])
    assert converted.exit_code == 0 and f"saved to {target}" in converted.stdout
    model = load(target)
    assert {layer.zeta for _, layer in __import__("dgc_convert").dgc_layers(model)} == {0.75}
    benched = runner.invoke(app, ["bench", str(target), "--repeats", "2", "--warmup", "1", "--json"])
    assert benched.exit_code == 0, benched.output
    assert json.loads(benched.stdout)["input_size"] == [3, 32, 32]


def test_models_not_from_create_model_or_prepared_are_refused(tmp_path):
    from dgc_convert.errors import DGCConvertError
    from dgc_convert.serving.prepare import prepare_for_inference

    with pytest.raises(DGCConvertError, match="needs a model built by dgc_convert.create_model"):
        save(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3)), tmp_path / "x.safetensors")
    model = create_model("resnet18", num_classes=3)
    convert(model)
    prepare_for_inference(model)
    with pytest.raises(DGCConvertError, match="before prepare_for_inference"):
        save(model, tmp_path / "y.safetensors")


def test_a_saved_model_loads_even_when_todays_rules_would_skip_its_layers(tmp_path, monkeypatch):
    import dgc_convert.conversion.surgery as surgery

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5)
    convert(model, zeta=0.5)
    path = save(model.eval(), tmp_path / "r18.safetensors", input_size=32)
    # A stricter eligibility rule introduced after the file was written: nothing converts any more.
    future_rule = (surgery.SkipReason.TOO_FEW_CHANNELS, "a rule from the future")  # (reason, detail)
    monkeypatch.setattr(surgery, "_reason_to_skip", lambda *args, **kwargs: future_rule)
    with pytest.raises(Exception, match="no convolution of resnet18 can be converted"):
        convert(create_model("resnet18", num_classes=5))
    loaded = load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# -- gating, pre-activation and squeeze rule ------------------------------------------------------


def _paper_style_model(**settings):
    """A network-gated, pre-activation, authors'-rule resnet18 with a nonzero threshold and
    calibrated BatchNorms (the layers' own norms included); returns it in eval mode and its input."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=7)
    convert(model, zeta=0.5, **{"gating": "network", "preact": True, "squeeze_rule": "authors", **settings})
    for _, layer in dgc_layers(model):
        if layer.gating == "network":
            layer.set_threshold(0.75)
    set_zeta(model, fraction=0.6)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics of the calibration batch itself
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def test_gating_preact_and_squeeze_rule_round_trip(tmp_path):
    model, x = _paper_style_model()
    path = save(model, tmp_path / "dgc-g.safetensors", input_size=32)
    entries = json.loads(read_metadata(path)["conversion"])
    assert {(e["gating"], e["preact"], e["squeeze_rule"]) for e in entries} == {("network", True, "authors")}
    loaded = load(path)
    for (name, layer), (_, again) in zip(dgc_layers(model), dgc_layers(loaded), strict=True):
        assert (again.gating, again.preact, again.squeeze_rule) == ("network", True, "authors"), name
        assert again.saliency_generator.hidden == layer.saliency_generator.hidden
        assert again.threshold_value == layer.threshold_value == pytest.approx(0.75)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(state) == set(loaded_state)
    assert any(k.endswith(".threshold") for k in state) and any(".norm.running_var" in k for k in state)
    for key, value in state.items():
        torch.testing.assert_close(loaded_state[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_per_layer_preact_and_squeeze_rule_round_trip(tmp_path):
    model, x = _paper_style_model(
        gating="head", preact=False, overrides={"layer4.*": {"preact": True, "squeeze_rule": "standard"}}
    )
    loaded = load(save(model, tmp_path / "mixed.safetensors", input_size=32))
    settings = {name: (layer.gating, layer.preact, layer.squeeze_rule) for name, layer in dgc_layers(loaded)}
    assert settings["layer4.0.conv1"] == ("head", True, "standard")
    assert settings["layer3.0.conv1"] == ("head", False, "authors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_entries_without_the_new_keys_load_as_head_no_preact_standard(tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=7)
    convert(model, zeta=0.5)
    metadata = model_metadata(model.eval(), 32)
    entries = json.loads(metadata["conversion"])
    for entry in entries:  # what save wrote before the keys existed
        del entry["gating"], entry["preact"], entry["squeeze_rule"]
    metadata["conversion"] = json.dumps(entries)
    path = tmp_path / "before.safetensors"
    save_model(model, str(path), metadata=metadata)
    loaded = load(path)
    assert {(layer.gating, layer.preact, layer.squeeze_rule) for _, layer in dgc_layers(loaded)} == {
        ("head", False, "standard")
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("gating", "global", "layer 'layer1.0.conv1': unknown gating 'global' (expected head or network)"),
        ("preact", "yes", "layer 'layer1.0.conv1': preact must be true or false, got 'yes'"),
        ("squeeze_rule", "se", "layer 'layer1.0.conv1': unknown squeeze_rule 'se' (expected standard or authors)"),
    ],
)
def test_bad_saved_settings_are_one_line(tmp_path, saved, key, value, message):
    entries = json.loads(read_metadata(saved)["conversion"])
    entries[0][key] = value
    path = _rewrite(saved, tmp_path / f"bad-{key}.safetensors", conversion=json.dumps(entries))
    with pytest.raises(LoadError) as caught:
        load(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_saved_settings_must_match_a_model_built_from_settings(tmp_path):
    from safetensors.torch import load_model

    model, x = _paper_style_model()
    path = save(model, tmp_path / "dgc-g.safetensors", input_size=32)
    rebuilt = create_model("resnet18", num_classes=7)
    convert(rebuilt, zeta=0.5, gating="network", preact=True, squeeze_rule="authors")
    apply_saved_layouts(rebuilt, read_metadata(path))
    load_model(rebuilt, str(path))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    head_wise = create_model("resnet18", num_classes=7)
    convert(head_wise, zeta=0.5, preact=True, squeeze_rule="authors")
    with pytest.raises(LoadError, match="layer layer1.0.conv1: saved with gating 'network', the model's is 'head'"):
        apply_saved_layouts(head_wise, read_metadata(path))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_file_has_the_usual_permissions_and_an_old_file_survives_a_failed_save(tmp_path, monkeypatch, mask):
    """safetensors writes 0600; save gives 0666 less the umask, and writes atomically."""
    model = create_model("resnet18", num_classes=7).eval()
    path = tmp_path / "m.safetensors"
    previous = os.umask(mask)
    try:
        save(model, path, input_size=32)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dgc_convert.conversion.saved_models.save_model", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(model, path, input_size=32)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_classes": str(10**12)},
            "metadata field 'num_classes' must be an integer in [1, 1000000], got 1000000000000",
        ),
        ({"num_classes": "-3"}, "metadata field 'num_classes' must be an integer in [1, 1000000], got -3"),
        ({"num_classes": "true"}, "metadata field 'num_classes' must be an integer in [1, 1000000], got True"),
        ({"num_classes": "7.5"}, "metadata field 'num_classes' must be an integer in [1, 1000000], got 7.5"),
        ({"num_classes": "1" * 5000}, "metadata field 'num_classes' is missing or not valid JSON"),
        ({"input_size": "[3, 0, 32]"}, "metadata field 'input_size' must be [channels, height, width]"),
        ({"input_size": "[3, 32, 100000]"}, "sides in [1, 8192], got [3, 32, 100000]"),
        ({"input_size": "[1000, 32, 32]"}, "channels in [1, 64], sides in [1, 8192], got [1000, 32, 32]"),
        ({"input_size": "[32, 32]"}, "got [32, 32]"),
        ({"input_size": "0"}, "got 0"),
        ({"model": ""}, "metadata field 'model' must be a model name, got ''"),
        ({"model": None}, "metadata field 'model' must be a model name, got None"),
        ({"library": "keras"}, "metadata field 'library' must be timm or torchvision, got 'keras'"),
        ({"conversion": "{}"}, "metadata field 'conversion' must be a list of layers, got {}"),
        ({"conversion": "[" * 100_000}, "metadata field 'conversion' is missing or not valid JSON"),
        ({"conversion": "[1]"}, "metadata field 'conversion': each layer must be a mapping, got 1"),
    ],
)
def test_absurd_metadata_is_refused_before_anything_is_built(tmp_path, saved, changes, message, monkeypatch):
    import dgc_convert.conversion.saved_models as serialize

    def never(*args, **kwargs):
        raise AssertionError("a model was built from bad metadata")

    monkeypatch.setattr(serialize, "create_model", never)
    path = _rewrite(saved, tmp_path / "absurd.safetensors", **changes)
    for call in (load, read_metadata):
        with pytest.raises(LoadError) as caught:
            call(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def _entry_with(saved, **changes):
    entries = json.loads(read_metadata(saved)["conversion"])
    entries[0].update(changes)
    return json.dumps(entries)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"heads": 0}, "layer 'layer1.0.conv1': heads must be a positive integer, got 0"),
        ({"heads": 10**12}, "heads=1000000000000 does not divide"),
        ({"heads": "4"}, "layer 'layer1.0.conv1': heads must be an integer, got '4'"),
        ({"heads": True}, "layer 'layer1.0.conv1': heads must be an integer, got True"),
        ({"zeta": 1.5}, "layer 'layer1.0.conv1': zeta must be in [0, 1), got 1.5"),
        ({"zeta": -0.1}, "layer 'layer1.0.conv1': zeta must be in [0, 1), got -0.1"),
        ({"zeta": float("nan")}, "layer 'layer1.0.conv1': zeta must be a finite number, got nan"),
        ({"squeeze_ratio": 0.5}, "layer 'layer1.0.conv1': squeeze_ratio must be >= 1, got 0.5"),
        ({"squeeze_ratio": float("inf")}, "squeeze_ratio must be a finite number, got inf"),
        ({"zeta_t": 3}, "layer 'layer1.0.conv1': zeta_t must be in [0, 1), got 3"),
        ({"name": 7}, "each layer needs a module name, got 7"),
        ({"name": "layer1.0.conv2"}, "layer 'layer1.0.conv2' appears twice"),
    ],
)
def test_bad_conversion_entries_are_one_line(tmp_path, saved, changes, message):
    path = _rewrite(saved, tmp_path / "entry.safetensors", conversion=_entry_with(saved, **changes))
    with pytest.raises(LoadError) as caught:
        load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_long_metadata_values_are_quoted_short(tmp_path, saved):
    path = _rewrite(saved, tmp_path / "long.safetensors", library="k" * 10_000)
    with pytest.raises(LoadError) as caught:
        load(path)
    assert str(caught.value).endswith("got '" + "k" * 79 + "... (10002 characters)")
    path = _rewrite(saved, tmp_path / "long-name.safetensors", model="m" * 10_000)
    with pytest.raises(LoadError) as caught:
        load(path)
    assert "(10002 characters)" in str(caught.value) and len(str(caught.value)) < 800
