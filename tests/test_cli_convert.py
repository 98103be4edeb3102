"""`dgc-convert MODEL ...` and `list-models` through Typer's test runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgc_convert.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_convert_prints_header_table_and_totals():
    result = invoke("resnet18", "--heads", "4", "--zeta", "0.5", "--input-size", "64")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "resnet18 from torchvision (picked automatically), input 3x64x64" in out
    assert "heads 4, zeta 0.5, squeeze ratio 16, min channels 16" in out
    assert "conv1" in out and "kept dense: stem: sees the image" in out
    assert "layer4.1.conv2" in out and "DGC H4 z0.5 k256" in out
    assert "converted 19 of 20 convolutions" in out and "% saved" in out


def test_json_has_the_documented_shape_and_nothing_else_on_stdout():
    result = invoke("resnet18", "--input-size", "64", "--zeta", "0.75", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and data["library"] == "torchvision"
    assert data["input_size"] == [3, 64, 64]
    assert data["settings"]["zeta"] == 0.75 and data["settings"]["heads"] == 4
    assert len(data["layers"]) == 20
    for layer in data["layers"]:
        assert {"name", "status", "reason", "dense_macs", "dgc_macs"} <= set(layer)
        assert layer["status"] in ("converted", "skipped")
        assert isinstance(layer["dense_macs"], int) and isinstance(layer["dgc_macs"], int)
    totals = data["totals"]
    assert {"dense_macs", "dgc_macs", "saving", "dense_params", "dgc_params"} <= set(totals)
    assert isinstance(totals["dense_macs"], int) and isinstance(totals["dgc_macs"], int)
    assert 0.6 < totals["saving"] < 0.75
    assert totals["dgc_params"] > totals["dense_params"]


def test_check_reports_the_identity_difference():
    result = invoke("timm:resnet18", "--input-size", "32", "--check", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["library"] == "timm"
    assert data["check"]["passed"] and data["check"]["identity_max_diff"] < 1e-3
    text = invoke("timm:resnet18", "--input-size", "32", "--check").stdout
    assert "identity check passed" in text


def test_include_exclude_min_channels_and_source():
    result = invoke(
        "resnet18",
        "--source",
        "timm",
        "--input-size",
        "32",
        "--include",
        "layer4.*",
        "--exclude",
        "layer4.0.downsample.0",
        "--min-channels",
        "300",
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["layer3.0.conv1"]["reason"] == "not matched by include"
    assert rows["layer4.0.downsample.0"]["reason"] == "matched by exclude"
    assert rows["layer4.0.conv1"]["reason"] == "in_channels=256 < min_channels=300"
    assert rows["layer4.1.conv1"]["status"] == "converted"


def test_recipe_supplies_model_and_settings_and_options_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet18, input_size: 32}\nconvert: {heads: 2, zeta: 0.25}\n")
    data = json.loads(invoke("--recipe", str(recipe), "--json").stdout)
    assert data["model"] == "resnet18" and data["input_size"] == [3, 32, 32]
    assert data["settings"]["heads"] == 2 and data["settings"]["zeta"] == 0.25
    data = json.loads(invoke("--recipe", str(recipe), "--zeta", "0.5", "--json").stdout)
    assert data["settings"]["zeta"] == 0.5 and data["settings"]["heads"] == 2


def test_list_models_lists_both_libraries():
    result = invoke("list-models", "resnet1*")
    assert result.exit_code == 0
    assert "resnet18" in result.stdout and "torchvision" in result.stdout and "timm" in result.stdout
    data = json.loads(invoke("list-models", "mobilenetv3_small", "--json").stdout)
    assert {"name": "mobilenetv3_small_050", "library": "timm"} in data


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnt50"], "unknown model 'resnt50' in timm or torchvision; did you mean resnet50"),
        (["resnet18", "--zeta", "1.5"], "zeta must be in [0, 1), got 1.5"),
        (["resnet18", "--heads", "0"], "heads must be a positive integer, got 0"),
        (
            ["resnet18", "--input-size", "32", "--include", "nothing*"],
            "include pattern 'nothing*' matches no convolution",
        ),
        (["timm:vit_tiny_patch16_224"], "no convolution of vit_tiny_patch16_224 can be converted"),
        (["resnet18", "--source", "keras"], "source must be one of auto, timm, torchvision"),
        (["--recipe", "missing.yaml"], "missing.yaml: no such recipe file"),
        (["list-models", "no-such-model-xyz"], "no model matches 'no-such-model-xyz'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.output


def test_console_script_and_top_level_cli_forward_to_the_app():
    # The script installed beside this interpreter: found whether or not its environment is activated.
    script = Path(sys.executable).with_name("dgc-convert")
    for command in ([str(script), "--version"], [sys.executable, str(ROOT / "cli.py"), "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("dgc-convert ")


# -- regressions from the architecture issue ----------------------------------------


def test_options_get_the_recipe_schema_bounds_and_messages():
    # The recipe schema refuses input_size < 8; the command line used to accept it.
    result = invoke("resnet18", "--input-size", "4")
    assert result.exit_code == 2 and result.stderr.strip() == "error: input_size must be >= 8, got 4"
    api = pytest.raises(Exception, match=r"zeta must be in \[0, 1\), got 1.5")
    from dgc_convert import convert, create_model

    with api:
        convert(create_model("resnet18"), zeta=1.5)
    assert "zeta must be in [0, 1), got 1.5" in invoke("resnet18", "--zeta", "1.5").stderr


def test_recipe_pretrained_is_honoured_by_convert_and_save(tmp_path, monkeypatch):
    import dgc_convert.conversion.build as build
    from dgc_convert.conversion.zoo import create_model

    asked = []

    def recording_create_model(name, **kwargs):
        asked.append(kwargs.get("pretrained"))
        return create_model(name, **{**kwargs, "pretrained": False})  # no download in tests

    monkeypatch.setattr(build, "create_model", recording_create_model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet18, pretrained: true, num_classes: 10, input_size: 32}\n")
    result = invoke("--recipe", str(recipe), "--save", str(tmp_path / "m.safetensors"), "--json")
    assert result.exit_code == 0, result.output
    assert asked == [True]


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(monkeypatch):
    import dgc_convert.measuring.conversion_summary as summary

    def broken(*args, **kwargs):
        raise ValueError("an internal bug\nsecond line")

    monkeypatch.setattr(summary, "summarize_conversion", broken)
    result = invoke("resnet18")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: internal error (ValueError: an internal bug); traceback written to "
    )
    written = Path(lines[0].rsplit(" ", 1)[1])
    assert "Traceback" in written.read_text() and "an internal bug" in written.read_text()
    written.unlink()


def test_library_refusals_and_unwritable_paths_are_one_line_not_internal_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    # torchvision refuses pretrained weights with another class count, before any download.
    recipe.write_text("model: {name: resnet18, pretrained: true, num_classes: 10}\n")
    result = invoke("--recipe", str(recipe))
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert "torchvision cannot build resnet18 with num_classes=10, pretrained weights" in result.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke("resnet18", "--input-size", "32", "--save", str(blocker / "sub" / "m.safetensors"))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(blocker) in result.stderr and "internal error" not in result.stderr


def test_settings_refuse_booleans_for_counts_and_accept_plain_mappings():
    from dgc_convert import ConversionError, convert, create_model
    from dgc_convert.conversion.settings import model_settings

    with pytest.raises(ConversionError, match=r"^heads must be a positive integer, got True$"):
        convert(create_model("resnet18"), heads=True)
    with pytest.raises(Exception, match=r"^name is required$"):
        model_settings()
    report = convert(create_model("resnet18"), {"heads": 2, "zeta": 0.25})
    assert {(d.heads, d.zeta) for d in report.converted} == {(2, 0.25)}


# -- gating, pre-activation and squeeze rule ----------------------------------------


def test_network_gating_preact_and_authors_rule_convert_and_check():
    args = ("resnet18", "--input-size", "32", "--gating", "network", "--preact", "--squeeze-rule", "authors", "--check")
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    s = data["settings"]
    assert (s["gating"], s["preact"], s["squeeze_rule"]) == ("network", True, "authors")
    converted = [row for row in data["layers"] if row["status"] == "converted"]
    assert len(converted) == 19
    assert {(r["gating"], r["preact"], r["squeeze_rule"]) for r in converted} == {("network", True, "authors")}
    assert data["totals"]["dgc_macs_expected"] is True
    assert data["check"]["passed"] and data["check"]["identity_max_diff"] < 1e-3
    text = invoke(*args).stdout
    assert "gating network (DGC-G: one model-wide threshold), pre-activation BN+ReLU, squeeze rule authors" in text
    assert "DGC-G H4 z0.5 k~32 preact" in text and "DGC MACs (expected)" in text
    assert "expected at target (" in text and "identity check passed" in text


def test_head_gating_is_shown_and_its_macs_are_not_expected():
    data = json.loads(invoke("resnet18", "--input-size", "32", "--no-preact", "--json").stdout)
    assert data["settings"]["gating"] == "head" and data["settings"]["preact"] is False
    assert data["totals"]["dgc_macs_expected"] is False
    text = invoke("resnet18", "--input-size", "32").stdout
    assert "min channels 16, gating head" in text and "expected" not in text


def test_recipe_overrides_set_preact_and_squeeze_rule_per_layer(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: resnet18, input_size: 32}\n"
        "convert: {preact: true, overrides: {'layer4.*': {preact: false, squeeze_rule: authors}}}\n"
    )
    result = invoke("--recipe", str(recipe), "--check", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert (rows["layer4.0.conv1"]["preact"], rows["layer4.0.conv1"]["squeeze_rule"]) == (False, "authors")
    assert (rows["layer3.0.conv1"]["preact"], rows["layer3.0.conv1"]["squeeze_rule"]) == (True, "standard")
    # The command line wins over the recipe's section (not over its per-layer overrides).
    rows = {r["name"]: r for r in json.loads(invoke("--recipe", str(recipe), "--no-preact", "--json").stdout)["layers"]}
    assert rows["layer3.0.conv1"]["preact"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet18", "--gating", "global"], "gating must be one of head, network, got 'global'"),
        (["resnet18", "--squeeze-rule", "se"], "squeeze_rule must be one of standard, authors, got 'se'"),
        (["bench", "resnet18", "--gating", "global"], "gating must be one of head, network, got 'global'"),
    ],
)
def test_bad_gating_or_squeeze_rule_is_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_an_override_with_gating_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\nconvert: {overrides: {'layer4.*': {gating: network}}}\n")
    result = invoke("--recipe", str(recipe))
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gating is model-wide" in lines[0]


def test_help_names_the_schema_defaults():
    text = " ".join(invoke("convert", "--help").stdout.replace("│", " ").split())  # rich's box and wrapping
    for option in ("--gating", "--preact", "--no-preact", "--squeeze-rule"):
        assert option in text
    assert "(default head)" in text and "(default off)" in text and "(default standard)" in text


# -- start from trained weights and pretrained ones ----------------------------------


def _one_line_error(result) -> str:
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_checkpoint_option_converts_the_given_weights(tmp_path):
    import torch

    from dgc_convert import create_model, load

    torch.manual_seed(3)
    trained = create_model("resnet18").state_dict()
    weights = tmp_path / "trained.pth"
    torch.save({"state_dict": trained}, weights)
    saved = tmp_path / "dgc.safetensors"
    result = invoke("resnet18", "--input-size", "32", "--checkpoint", str(weights), "--save", str(saved))
    assert result.exit_code == 0, result.output
    assert f"started from the weights in {weights}" in result.stdout
    converted = load(saved).state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_var", "fc.bias"):
        assert torch.equal(converted[key], trained[key]), key


def test_checkpoint_option_wins_over_the_recipe_and_excludes_pretrained(tmp_path):
    from safetensors.torch import save_file

    from dgc_convert import create_model

    weights = tmp_path / "ten.safetensors"
    save_file(create_model("resnet18", num_classes=10).state_dict(), str(weights))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: resnet18, num_classes: 10, checkpoint: {tmp_path / 'gone.pth'}}}\n")
    assert "gone.pth: no such file" in _one_line_error(invoke("--recipe", str(recipe)))
    result = invoke("--recipe", str(recipe), "--input-size", "32", "--checkpoint", str(weights), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(weights)
    recipe.write_text("model: {name: resnet18, num_classes: 10, pretrained: true}\n")
    message = _one_line_error(invoke("--recipe", str(recipe), "--checkpoint", str(weights)))
    assert message == (
        f"error: pretrained and checkpoint are both set: start from the library's weights or from {weights}, not both"
    )


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path):
    import torch

    from dgc_convert import create_model

    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    message = _one_line_error(invoke("resnet18", "--checkpoint", str(text)))
    assert f"{text}: not a readable PyTorch checkpoint" in message
    other = tmp_path / "ten.pth"
    torch.save(create_model("resnet18", num_classes=10).state_dict(), other)
    message = _one_line_error(invoke("resnet18", "--checkpoint", str(other)))
    assert "does not fit torchvision resnet18: 2 differ in shape or dtype (fc.weight: file (10, 512), model " in message


def test_recipe_pretrained_reaches_the_library_with_and_without_save(tmp_path, library_calls):
    from dgc_convert import load

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet18, pretrained: true, input_size: 32}\n")
    saved = tmp_path / "m.safetensors"
    # The reported case is MODEL --recipe R --save F; timm's tiny test net keeps it quick.
    for args, library, asked in [
        (["--recipe", str(recipe)], "torchvision", "DEFAULT"),
        (["timm:test_resnet", "--recipe", str(recipe), "--save", str(saved)], "timm", True),
    ]:
        library_calls.clear()
        result = invoke(*args, "--json")
        assert result.exit_code == 0, result.output
        assert library_calls == [(library, asked)], args
    library_calls.clear()
    load(saved)  # the saved file holds the weights: rebuilding it asks the library for none
    assert library_calls == [("timm", False)]


def test_a_conversion_that_saves_nothing_says_so_in_one_line_and_in_json(tmp_path):
    # zeta 0 keeps every channel, so the generators are pure cost; the override forces every layer.
    recipe = tmp_path / "forced.yaml"
    recipe.write_text('model: resnet18\nconvert:\n  zeta: 0.0\n  overrides:\n    "*": {skip: false}\n')
    result = invoke("--recipe", str(recipe), "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("the conversion saves nothing") == 1
    data = json.loads(invoke("--recipe", str(recipe), "--input-size", "32", "--json").stdout)
    assert data["totals"]["saves_nothing"] is True and data["totals"]["saving"] < 0
    data = json.loads(invoke("resnet18", "--input-size", "32", "--json").stdout)
    assert data["totals"]["saves_nothing"] is False
    # Without the override nothing converts, and that is the error.
    result = invoke("resnet18", "--zeta", "0")
    assert result.exit_code == 2
    assert "no convolution of resnet18 can be converted (no saving as DGC; stem: sees the image)" in result.stderr


def test_a_recipe_converts_the_model_its_training_would_build(tmp_path):
    # The data set's class count and the size the run trains at, so the dense
    # digits model a run wrote loads here as it would in `train`.
    from safetensors.torch import save_file

    from dgc_convert import create_model

    dense = create_model("resnet18", num_classes=10)
    weights = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, weights)
    result = invoke("--recipe", str(ROOT / "recipes/digits.yaml"), "--checkpoint", str(weights), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_size"] == [3, 32, 32] and data["totals"]["dense_macs"] == 37_220_352
    assert data["totals"]["dense_params"] == sum(p.numel() for p in dense.parameters())


def test_check_refuses_a_size_whose_activations_would_not_fit(monkeypatch):
    import dgc_convert.measuring.conversion_summary as summary

    monkeypatch.setattr(summary, "available_memory", lambda: 16 << 30)
    result = invoke("resnet18", "--input-size", "20000", "--check")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: --check at 20000x20000 would hold about 152.0 GiB of activations and 16.0 GiB"
    )
    assert result.stderr.count("\n") == 1
    # Counting alone is bounded at any size.
    data = json.loads(invoke("resnet18", "--input-size", "20000", "--json").stdout)
    assert data["totals"]["dense_macs"] == 14_537_000_512_512
