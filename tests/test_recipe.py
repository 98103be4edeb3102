"""Recipe schema: safe loading, --set overrides and one-line errors."""

from __future__ import annotations

import pytest

from dgc_convert.errors import RecipeError
from dgc_convert.training.recipe import load_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults_and_overrides(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "model: resnet18\n"), ["train.epochs=3", "convert.zeta=0.75", "data.dataset=synthetic"]
    )
    assert recipe.model.name == "resnet18"
    assert recipe.train.epochs == 3 and recipe.convert.zeta == 0.75 and recipe.data.dataset == "synthetic"
    assert recipe.train.warmup_fraction == pytest.approx(1 / 12) and recipe.train.sparsity_lambda == 1e-5


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model: resnet18\ntrian: {}\n", [], "unknown key 'trian'; allowed: model, convert, train, data, output"),
        ("model: {name: r, bogus: 1}\n", [], "unknown key 'model.bogus'; allowed: name, source"),
        (
            "model: r\nconvert: {overrides: {'a*': {hed: 2}}}\n",
            [],
            "unknown key 'convert.overrides.a*.hed'; allowed: heads",
        ),
        ("convert: {}\n", [], "model: required key is missing"),
        ("model: r\ntrain: {epochs: 0}\n", [], "train.epochs=0: Input should be greater than or equal to 1"),
        ("model: r\nconvert: {zeta: 1.5}\n", [], "convert.zeta=1.5: Input should be less than 1"),
        ("model: r\ntrain: {amp: fp8}\n", [], "train.amp='fp8': Input should be 'off', 'bf16' or 'fp16'"),
        ("model: r\ndata: {dataset: cifar10}\n", [], "dataset cifar10 needs data.root"),
        (
            "model: r\ntrain: {warmup_fraction: 0.5, finetune_fraction: 0.6}\n",
            [],
            "warmup_fraction + finetune_fraction must be <= 1",
        ),
        ("model: [unclosed\n", [], "not valid YAML (line 2, column 1)"),
        ("- a list\n", [], "expected a mapping at the top level, got list"),
        ("model: r\n", ["train.epochs"], "--set 'train.epochs': expected KEY.PATH=VALUE"),
        ("model: r\n", ["train.lr=-1"], "train.lr=-1: Input should be greater than 0"),
        ("model: r\ntrain: 3\n", ["train.epochs=2"], "'train' is not a section"),
        ("model: r\ntrain: {zeta: 0.5}\n", [], "unknown key 'train.zeta'; allowed: epochs, batch_size"),
        ("model: r\ntrain: {optimizer: adam}\n", [], "train.optimizer='adam': Input should be 'sgd' or 'adamw'"),
        (
            "model: r\ndata: {dataset: mnist}\n",
            [],
            "data.dataset='mnist': Input should be 'cifar10', 'cifar100', 'imagefolder', 'digits' or 'synthetic'",
        ),
        ("model: r\ndata: {augmentation: mixup}\n", [], "data.augmentation='mixup': Input should be 'none'"),
        ("model: r\nconvert: {heads: four}\n", [], "convert.heads='four': Input should be a valid integer"),
        ("model: r\ntrain: {zeta_ramp: step}\n", [], "train.zeta_ramp='step': Input should be 'linear' or 'cosine'"),
        ("model: r\noutput: {dir: x}\n", [], "unknown key 'output.dir'; allowed: directory"),
        ("model: r\ntrain: {batch_size: 0}\n", [], "train.batch_size=0: Input should be greater than or equal to 1"),
        ("model: r\n", ["data.download=maybe"], "data.download='maybe': Input should be a valid boolean"),
    ],
)
def test_malformed_recipes_give_one_line_naming_file_key_and_value(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    text = str(caught.value)
    assert "\n" not in text
    assert message in text
    assert str(path) in text or "--set" in text


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_tags_that_would_construct_objects_are_refused(tmp_path):
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_gating_preact_and_squeeze_rule_defaults_come_from_the_layer(tmp_path):
    from dgc_convert.nn.layer import DEFAULT_GATING, DEFAULT_SQUEEZE_RULE

    recipe = load_recipe(write(tmp_path, "model: resnet18\n"))
    assert (recipe.convert.gating, recipe.convert.preact, recipe.convert.squeeze_rule) == (
        DEFAULT_GATING,
        False,
        DEFAULT_SQUEEZE_RULE,
    )
    recipe = load_recipe(
        write(
            tmp_path,
            "model: resnet18\nconvert: {gating: network, preact: true, squeeze_rule: authors,"
            " overrides: {'layer4.*': {preact: false, squeeze_rule: standard}}}\n",
        )
    )
    c = recipe.convert
    assert (c.gating, c.preact, c.squeeze_rule) == ("network", True, "authors")
    assert (c.overrides["layer4.*"].preact, c.overrides["layer4.*"].squeeze_rule) == (False, "standard")
    assert c.overrides["layer4.*"].heads is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("convert: {gating: global}", "convert.gating='global': Input should be 'head' or 'network'"),
        ("convert: {squeeze_rule: se}", "convert.squeeze_rule='se': Input should be 'standard' or 'authors'"),
        ("convert: {preact: maybe}", "convert.preact='maybe': Input should be a valid boolean"),
        (
            "convert: {overrides: {'a*': {gating: network}}}",
            "convert.overrides.a*={'gating': 'network'}: gating is model-wide",
        ),
        (
            "convert: {overrides: {'a*': {sqeeze_rule: authors}}}",
            "allowed: heads, zeta, squeeze_ratio, skip, preact, squeeze_rule",
        ),
    ],
)
def test_bad_gating_preact_and_squeeze_rule_are_one_line(tmp_path, text, message):
    path = write(tmp_path, f"model: r\n{text}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_model_checkpoint_is_a_path_and_excludes_pretrained(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: {name: resnet18, checkpoint: runs/dense/best}\n"))
    assert recipe.model.checkpoint == "runs/dense/best" and recipe.model.pretrained is False
    assert load_recipe(write(tmp_path, "model: resnet18\n")).model.checkpoint is None
    path = write(tmp_path, "model: {name: resnet18, pretrained: true, checkpoint: w.pth}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).endswith(
        "pretrained and checkpoint are both set: start from the library's weights or from w.pth, not both"
    )
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    # --set model.checkpoint= (no value) unsets it again.
    assert load_recipe(path, ["model.checkpoint="]).model.checkpoint is None
    with pytest.raises(RecipeError, match=r"model.checkpoint='': String should have at least 1 character"):
        load_recipe(write(tmp_path, "model: {name: resnet18, checkpoint: ''}\n"))


def _alias_bomb(levels: int = 9) -> str:
    """The billion laughs: each level a list of nine aliases of the one before (9**levels strings)."""
    import itertools

    names = "abcdefghijklmnopqrstuvwxyz"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in itertools.pairwise(names[:levels]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    import time

    path = write(tmp_path, "model: resnet18\n" + _alias_bomb())
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert time.perf_counter() - started < 1.0
    assert str(caught.value) == f"{path}: YAML anchors are not allowed (line 2, column 4)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: r\nx: *a\n", "YAML aliases are not allowed (line 2, column 4)"),
        ("model: r\nconvert: &c {zeta: 0.5}\n", "YAML anchors are not allowed (line 2, column 10)"),
        (
            "model: r\ntrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n",
            "duplicate key 'epochs' (line 5, column 3); each key may appear once",
        ),
        ("model: r\nmodel: s\n", "duplicate key 'model' (line 2, column 1); each key may appear once"),
        ("model: r\nconvert: {overrides: {a: {zeta: 0.5}, a: {}}}\n", "duplicate key 'a' (line 2, column 39)"),
    ],
)
def test_aliases_anchors_and_duplicate_keys_are_one_line_with_line_and_column(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value)


def test_set_values_refuse_aliases_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "model: resnet18\n")
    with pytest.raises(
        RecipeError, match=r"^--set 'convert=\{a: &x 1\}': YAML anchors are not allowed \(column 5 of the value\)$"
    ):
        load_recipe(path, ["convert={a: &x 1}"])
    with pytest.raises(
        RecipeError, match=r"duplicate key 'zeta' \(column 13 of the value\); each key may appear once$"
    ):
        load_recipe(path, ["convert={zeta: 0.5, zeta: 0.7}"])
    assert load_recipe(path, ["output.directory=runs/x y"]).output.directory == "runs/x y"


def test_oversized_non_utf8_directory_and_symlink_loop_recipes_are_one_line(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model: resnet18\n" + "# padding\n" * 120_000)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: résnet\n".encode("latin-1"))
    folder = tmp_path / "recipes"
    folder.mkdir()
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(loop)
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "gone.yaml")
    for path, message in [
        (big, "over 1 MiB; a recipe is a short text file"),
        (latin, "not a text file (not UTF-8 at byte 8)"),
        (folder, "is a directory, not a recipe file"),
        (loop, "a symlink loop, not a recipe file"),
        (dangling, "no such recipe file (a symlink to a missing file)"),
    ]:
        with pytest.raises(RecipeError) as caught:
            load_recipe(path)
        assert str(caught.value) == f"{path}: {message}"


def test_long_values_are_quoted_short(tmp_path):
    long = "x" * 5000
    path = write(tmp_path, f"model: r\ntrain: {{amp: {long}}}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    text = str(caught.value)
    assert f"train.amp='{'x' * 79}... (5002 characters): Input should be" in text and len(text) < 300
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, f"model: r\ntrain:\n  ? {long}\n  : 1\n"))  # an explicit key: any length
    assert "unknown key 'train.xxx" in str(caught.value) and "(5008 characters)" in str(caught.value)
    assert len(str(caught.value)) < 600
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, "model: r\n"), [f"train.{long}=1"])
    assert str(caught.value).count("(5008 characters)") == 2 and len(str(caught.value)) < 600


def test_shown_cuts_long_values_and_huge_ints():
    from dgc_convert.errors import shown

    assert shown("abc") == "'abc'"
    assert shown("y" * 200) == "'" + "y" * 79 + "... (202 characters)"
    assert shown("y" * 200, quoted=False) == "y" * 80 + "... (200 characters)"
    assert shown(10**5000).startswith("an integer of about 5000 digits")


def test_num_classes_is_bounded(tmp_path):
    from dgc_convert.conversion.settings import model_settings
    from dgc_convert.errors import SettingsError

    with pytest.raises(RecipeError, match=r"model.num_classes=1000000000000: Input should be less than or equal"):
        load_recipe(write(tmp_path, "model: {name: r, num_classes: 1000000000000}\n"))
    with pytest.raises(SettingsError, match=r"^num_classes must be in \[1, 1000000\], got 1000000000000$"):
        model_settings(name="r", num_classes=10**12)
