"""Every recipe in recipes/ loads, validates and converts the layers it says it converts."""

from pathlib import Path

import pytest
import torch

from dgc_convert.conversion.build import build_model
from dgc_convert.training.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_promised_recipes_are_there():
    assert {p.stem for p in RECIPES} >= {
        "digits",
        "resnet18_imagenet",
        "resnet50_imagenet",
        "resnet18_cifar10",
        "densenet121_imagenet",
        "digits_finetune",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_model_converts(path):
    recipe = load_recipe(path)
    assert recipe.convert.enabled and not recipe.model.pretrained and not recipe.data.download
    # A recipe that starts from a trained model names a file that only a run makes
    # (test_the_finetune_recipe_starts_from_a_dense_digits_run).
    built = build_model(recipe.model, recipe.convert, num_classes=recipe.model.num_classes or 10, load_checkpoint=False)
    report = built.report
    assert report.converted, path.name
    names = [d.name for d in report.converted]
    if path.stem == "densenet121_imagenet":
        assert len(names) == 58 and all(n.endswith(".conv1") and ".denselayer" in n for n in names)
    if path.stem.startswith("resnet18"):
        # The paper's placement: every 3x3 of the blocks and every 1x1 shortcut; not the stem.
        assert len(names) == 19 and "conv1" not in names


def test_paper_resnet18_settings():
    recipe = load_recipe(next(p for p in RECIPES if p.stem == "resnet18_imagenet"))
    t = recipe.train
    assert (recipe.convert.heads, recipe.convert.zeta, t.epochs, t.batch_size, t.lr, t.weight_decay) == (
        4,
        0.55,
        120,
        256,
        0.1,
        1e-4,
    )
    assert t.optimizer == "sgd" and t.nesterov and t.momentum == 0.9
    cifar = load_recipe(next(p for p in RECIPES if p.stem == "resnet18_cifar10"))
    assert (cifar.train.epochs, cifar.train.batch_size) == (300, 64)
    # The authors' layer: its own BN + ReLU in front, their generator width and init; head-wise gating.
    for paper in (recipe, cifar):
        c = paper.convert
        assert (c.preact, c.squeeze_rule, c.gating, c.heads) == (True, "authors", "head", 4)
    assert cifar.convert.zeta == 0.5


def test_paper_resnet18_layers_are_preactivated_with_the_authors_generators():
    from dgc_convert.conversion.surgery import dgc_layers

    recipe = load_recipe(next(p for p in RECIPES if p.stem == "resnet18_imagenet"))
    built = build_model(recipe.model, recipe.convert, num_classes=10)
    layers = dgc_layers(built.model)
    assert len(layers) == 19 and all(layer.norm is not None for _, layer in layers)
    hidden = {name: layer.saliency_generator.hidden for name, layer in layers}
    # d 16, halved below 80 input channels: 64 // 8, 128 // 16.
    assert hidden["layer1.0.conv1"] == 8 and hidden["layer2.0.conv2"] == 8 and hidden["layer4.0.conv1"] == 16


def test_the_paper_imagenet_recipe_has_the_authors_parameter_count(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import test_import_authors as authors

    monkeypatch.setattr(authors, "CLASSES", 1000)
    theirs = authors.authors_state_dict()  # their published key layout and shapes
    buffers = ("running_mean", "running_var", "num_batches_tracked", "_inactive_channels")
    recipe = load_recipe(RECIPES[[p.stem for p in RECIPES].index("resnet18_imagenet")])
    model = build_model(recipe.model, recipe.convert).model
    count = sum(v.numel() for k, v in theirs.items() if not k.endswith(buffers))
    assert sum(p.numel() for p in model.parameters()) == count == 12_335_144


def test_the_finetune_recipe_starts_from_a_dense_digits_run(tmp_path, monkeypatch):
    """The README's two commands, one epoch each: a dense digits run, then the fine-tune
    recipe from its last checkpoint, with the paths it names (relative to the working directory)."""
    from safetensors.torch import load_file

    from dgc_convert.training.distributed import Processes
    from dgc_convert.training.setup import build_training
    from dgc_convert.training.trainer import train

    monkeypatch.chdir(tmp_path)
    one_epoch = ["train.epochs=1"]
    dense = load_recipe(
        next(p for p in RECIPES if p.stem == "digits"),
        ["convert.enabled=false", "output.directory=runs/digits-dense", *one_epoch],
    )
    train(dense)
    finetune = load_recipe(next(p for p in RECIPES if p.stem == "digits_finetune"), one_epoch)
    assert finetune.model.checkpoint == "runs/digits-dense/last" and finetune.train.epochs * 3 <= 15

    # The converted model starts from the dense weights: the stem stays dense, the
    # DGC layers carry the dense filters.
    saved = load_file("runs/digits-dense/last/model.safetensors")
    setup = build_training(finetune, Processes.single())
    state = setup.model.state_dict()
    assert torch.equal(state["conv1.weight"], saved["conv1.weight"])
    assert torch.equal(state["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    assert "layer4.1.conv2.saliency_generator.beta" in state

    result = train(finetune)
    assert result.status == "finished" and (tmp_path / "runs/digits-finetune/last/model.safetensors").is_file()

    # Both digits runs drew their curves; `plot` draws the two on the same axes.
    from PIL import Image
    from typer.testing import CliRunner

    from dgc_convert.cli import app
    from dgc_convert.files.names import CURVES_FILE
    from dgc_convert.files.plots import CURVES_DPI, CURVES_SIZE

    size = (CURVES_SIZE[0] * CURVES_DPI, CURVES_SIZE[1] * CURVES_DPI)
    for run in ("runs/digits-dense", "runs/digits-finetune"):
        with Image.open(tmp_path / run / CURVES_FILE) as picture:
            assert picture.format == "PNG" and picture.size == size
            darkest, lightest = picture.convert("L").getextrema()
            assert darkest < lightest  # drawn on, not blank
    result = CliRunner().invoke(app, ["plot", "runs/digits-dense", "runs/digits-finetune", "--out", "both.png"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "both.png") as picture:
        assert picture.format == "PNG" and picture.size == size
