"""`--num-classes` on `dgc-convert MODEL` and `bench`: a classifier of another width, bounded like the recipe's."""

from __future__ import annotations

from typer.testing import CliRunner

from dgc_convert import load
from dgc_convert.cli import app

runner = CliRunner()


def test_convert_builds_and_saves_the_model_with_the_class_count_given(tmp_path):
    path = tmp_path / "two.safetensors"
    result = runner.invoke(app, ["resnet18", "--num-classes", "2", "--input-size", "32", "--save", str(path)])
    assert result.exit_code == 0, result.output
    model = load(path)
    assert model.fc.out_features == 2 and model.dgc_model_info.num_classes == 2


def test_a_class_count_out_of_bounds_is_one_line():
    result = runner.invoke(app, ["resnet18", "--num-classes", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: num_classes must be in [1, 1000000], got 0"


def test_bench_refuses_a_class_count_for_a_saved_model(tmp_path):
    path = tmp_path / "m.safetensors"
    assert runner.invoke(app, ["resnet18", "--input-size", "32", "--save", str(path)]).exit_code == 0
    result = runner.invoke(app, ["bench", str(path), "--num-classes", "2"])
    assert result.exit_code == 2
    assert "--num-classes applies to model names" in result.stderr
