"""timm's pretrained tags (ARCH.TAG, e.g. resnet18.a1_in1k) are model names like any other."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dgc_convert import UnknownModelError, convert, create_model, load, save
from dgc_convert.cli import app
from dgc_convert.conversion.zoo import list_models, resolve

runner = CliRunner()


def test_a_tagged_name_resolves_to_timm_whichever_way_it_is_written():
    assert resolve("resnet18.a1_in1k") == ("resnet18.a1_in1k", "timm", True)
    assert resolve("timm:resnet18.a1_in1k") == ("resnet18.a1_in1k", "timm", False)
    assert resolve("resnet18.a1_in1k", "timm") == ("resnet18.a1_in1k", "timm", False)


def test_an_unknown_tag_lists_the_architectures_tags():
    with pytest.raises(
        UnknownModelError, match=r"^unknown pretrained tag 'b9_in1k' for timm model 'resnet18'; its tags: a1_in1k"
    ):
        resolve("resnet18.b9_in1k")


def test_a_misspelt_tagged_name_gets_close_matches():
    with pytest.raises(UnknownModelError, match=r"did you mean resnet18\.a1_in1k"):
        resolve("resnet1B.a1_in1k")


def test_list_models_shows_tags_only_when_asked():
    assert list_models("resnet18.a1*") == []
    assert ("resnet18.a1_in1k", "timm") in list_models("resnet18.a1*", tags=True)
    result = runner.invoke(app, ["list-models", "resnet18.a1*", "--tags", "--json"])
    assert result.exit_code == 0, result.output
    assert {"name": "resnet18.a1_in1k", "library": "timm"} in json.loads(result.stdout)


def test_a_tagged_model_converts_saves_and_loads_back_equal(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18.a1_in1k", num_classes=3)
    assert model.dgc_model_info.name == "resnet18.a1_in1k"
    convert(model, zeta=0.5, input_size=32)
    path = save(model.eval(), tmp_path / "tagged.safetensors", input_size=32)
    loaded = load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
