"""Sparse inference: every algorithm equals the training computation; prepare and bench."""

import contextlib
import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dgc_convert import DGCConv2d, convert, create_model
from dgc_convert.cli import app
from dgc_convert.measuring.bench import benchmark, realized_fraction
from dgc_convert.nn import compiled
from dgc_convert.nn.sparse import ALGORITHMS, WeightCache, algorithm_cache, clear_algorithm_cache, sparse_conv2d
from dgc_convert.serving.prepare import prepare_for_inference

CASES = [
    # (in, out, kernel, stride, padding, dilation, heads, zeta, size)
    (16, 8, 3, 1, 1, 1, 4, 0.5, 9),
    (32, 16, 3, 2, 1, 1, 2, 0.75, 7),
    (24, 24, 1, 1, 0, 1, 4, 0.5, 6),
    (24, 12, 1, 2, 0, 1, 3, 0.3, 7),
    (16, 16, 3, 1, 2, 2, 8, 0.9, 10),
    (20, 8, 5, 1, 2, 1, 1, 0.0, 8),
    (18, 6, 3, 1, 0, 1, 6, 0.6, 5),
]


LAYOUTS = pytest.mark.parametrize("interleaved", [False, True], ids=["blocked", "interleaved"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}k{c[2]}s{c[3]}d{c[5]}h{c[6]}z{c[7]}")
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("channels_last", [False, True])
@LAYOUTS
def test_every_algorithm_equals_the_training_computation(case, batch, channels_last, interleaved):
    c_in, c_out, kernel, stride, padding, dilation, heads, zeta, size = case
    torch.manual_seed(batch)
    layer = DGCConv2d(
        c_in, c_out, kernel, stride, padding, dilation, bias=True, heads=heads, zeta=zeta, interleaved=interleaved
    )
    x = torch.randn(batch, c_in, size, size + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = layer(x).detach()  # training mode: the masked computation
    layer.eval()
    with torch.no_grad():
        for algorithm in [*ALGORITHMS, "auto", "export", *(["compiled"] if compiled.available() else [])]:
            if algorithm == "gather_pointwise" and (kernel != 1 or padding != 0):
                continue
            layer.inference_algorithm = algorithm
            with compiled.paused() if algorithm == "auto" else contextlib.nullcontext():  # auto: the timed PyTorch path
                out = layer(x)
            assert out.shape == reference.shape
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5, msg=f"{algorithm}")
            if algorithm == "compiled":
                assert layer.last_algorithm == "compiled" and out.is_contiguous(memory_format=torch.channels_last)
            elif algorithm != "export":
                assert layer.last_algorithm in ALGORITHMS
                # A standard memory format; gather_conv's channels-last convolution comes back NCHW.
                assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last), algorithm
                assert out.is_contiguous() or algorithm != "gather_conv"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_weight_cache_and_the_timed_choice_follow_the_layout(algorithm):
    torch.manual_seed(0)
    layer = DGCConv2d(24, 12, 1, heads=3, zeta=0.5)
    x = torch.randn(2, 24, 5, 5)
    expected = {}
    for interleaved in (False, True):
        layer.interleaved = interleaved
        expected[interleaved] = layer(x).detach()
    assert not torch.allclose(expected[False], expected[True])  # the layout matters to the result
    layer.eval()
    layer.inference_algorithm = algorithm
    with torch.no_grad():
        for interleaved in (False, True, False):  # flipping the plain attribute re-arranges the weight
            layer.interleaved = interleaved
            torch.testing.assert_close(layer(x), expected[interleaved], rtol=1e-5, atol=1e-5)
    clear_algorithm_cache()
    layer.inference_algorithm = "auto"
    with torch.no_grad(), compiled.paused():
        for interleaved in (False, True):
            layer.interleaved = interleaved
            layer(x)
    # The algorithms compute blocked whatever the layout (the relabelling is the layer's):
    # one timing serves both.
    assert len(algorithm_cache()) == 1


def test_auto_times_once_per_case_and_caches_the_choice():
    clear_algorithm_cache()
    layer = DGCConv2d(32, 32, 3, padding=1, heads=4, zeta=0.5).eval()
    with torch.no_grad(), compiled.paused():
        layer(torch.randn(1, 32, 8, 8))
        layer(torch.randn(1, 32, 8, 8))
        layer(torch.randn(2, 32, 8, 8))
    cache = algorithm_cache()
    assert len(cache) == 2 and set(cache.values()) <= set(ALGORITHMS)


def test_weight_cache_follows_weight_changes():
    layer = DGCConv2d(16, 8, 3, padding=1, heads=2, zeta=0.5).eval()
    layer.inference_algorithm = "gather_conv"
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)  # an in-place update must not leave a stale arrangement
        out = layer(x)
        layer.inference_algorithm = "masked"
        torch.testing.assert_close(out, layer(x))


def test_bad_algorithm_names():
    layer = DGCConv2d(16, 8, 3, padding=1, heads=2).eval()
    with pytest.raises(ValueError, match="algorithm must be 'auto' or one of"):
        layer.inference_algorithm = "fastest"  # refused when set, not at the next forward
    with pytest.raises(ValueError, match="algorithm must be 'auto' or one of"):
        sparse_conv2d(
            torch.randn(1, 16, 4, 4),
            torch.ones(1, 2, 8),
            torch.zeros(1, 2, 8, dtype=torch.long),
            layer.weight,
            WeightCache(),
            (1, 1),
            (1, 1),
            (1, 1),
            "fastest",
        )
    layer.inference_algorithm = "gather_pointwise"
    with pytest.raises(ValueError, match="1x1 convolutions"):
        with torch.no_grad():
            layer(torch.randn(1, 16, 4, 4))


def _trained_like(model, size):
    """Give BatchNorm real running statistics (and the identity a reason to be checked)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 3, size, size))
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_prepare_for_inference_keeps_outputs_and_folds_batchnorm(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    convert(model, heads=4, zeta=0.5)
    model = _trained_like(model, 64)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    prepared = copy.deepcopy(model)
    report = prepare_for_inference(prepared)
    assert report.trace_error is None and report.folded and report.dgc_layers > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules()) or report.not_folded
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), expected, rtol=1e-4, atol=1e-5)


def test_prepare_reports_batchnorms_it_cannot_fold():
    model = create_model("densenet121", num_classes=4)
    convert(model, include=["features.denseblock1.*"])
    report = prepare_for_inference(model)
    reasons = dict(report.not_folded)
    assert reasons["features.denseblock1.denselayer1.norm1"] == "does not directly follow a convolution"


def test_benchmark_reports_the_documented_figures():
    torch.manual_seed(0)
    dense = create_model("resnet18", num_classes=10)
    dgc = copy.deepcopy(dense)
    convert(dgc, zeta=0.75)
    threads = torch.get_num_threads()
    result = benchmark(
        dense, dgc, name="resnet18", batch_size=1, input_size=32, repeats=2, warmup=1, engine="eager", threads=1
    )
    assert torch.get_num_threads() == threads and result.threads == 1  # set for the measurement, then restored
    assert result.dense_ms > 0 and result.dgc_ms > 0 and result.dgc_masked_ms > 0
    assert result.dense_engine == result.dgc_engine == "eager" and result.dense_compiled_ms is None
    assert result.dense_ms == result.dense_eager_ms and result.dgc_ms == result.dgc_eager_ms
    assert result.dense_layout in ("nchw", "channels_last", "channels_last+packed")
    assert result.speedup == pytest.approx(result.dense_ms / result.dgc_ms)
    assert 0.2 < result.mac_ratio < 0.5
    assert result.realized_fraction == pytest.approx(
        realized_fraction(result.dense_ms, result.dgc_ms, result.mac_ratio)
    )
    names = {row.name for row in result.layers}
    assert "conv1" in names and "layer1.0.conv1" in names
    converted = next(row for row in result.layers if row.name == "layer1.0.conv1")
    assert converted.algorithm in (*ALGORITHMS, "compiled") and converted.mac_ratio < 0.5
    assert converted.saliency_ms is not None and converted.select_ms is not None and converted.conv_ms is not None
    assert converted.saliency_ms + converted.select_ms > 0
    stem = next(row for row in result.layers if row.name == "conv1")
    assert stem.saliency_ms is None and stem.algorithm is None


def test_bench_command_json_has_the_fields():
    result = CliRunner().invoke(
        app,
        ["bench", "resnet18", "--input-size", "32", "--repeats", "2", "--warmup", "1", "--engine", "compile", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("dense_ms", "dgc_masked_ms", "dgc_ms", "speedup", "mac_ratio", "realized_fraction", "layers"):
        assert key in data
    assert data["dgc_engine"] == "compile" and data["dense_engine"] in ("eager", "compile")
    assert data["dense_ms"] == min(data["dense_eager_ms"], data["dense_compiled_ms"])
    assert data["dgc_ms"] == data["dgc_compiled_ms"] and data["dgc_eager_ms"] > 0
    assert data["speedup"] == pytest.approx(data["dense_ms"] / data["dgc_ms"])
    assert data["dense_compile_s"] > 0 and data["dgc_compile_s"] > 0 and data["dgc_in_graph"]
    layer = data["layers"][1]
    for key in ("name", "dense_ms", "dgc_masked_ms", "dgc_ms", "speedup", "mac_ratio", "realized_fraction"):
        assert key in layer
    for key in ("saliency_ms", "select_ms", "conv_ms"):
        assert key in layer


def test_bench_command_table_and_bad_input(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(
        app,
        [
            "bench",
            "resnet18",
            "--input-size",
            "32",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--layers",
            "3",
            "--engine",
            "eager",
        ],
    )
    assert shown.exit_code == 0 and "of the theoretical saving realised" in shown.stdout
    assert "DGC masked ms" in shown.stdout and "(eager)" in shown.stdout and "top-k" in shown.stdout
    engine = runner.invoke(app, ["bench", "resnet18", "--engine", "jit"])
    assert engine.exit_code == 2 and "--engine" in engine.stderr
    bad = runner.invoke(app, ["bench", "resnt18"])
    assert bad.exit_code == 2 and "did you mean resnet18" in bad.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    junk = runner.invoke(app, ["bench", str(tmp_path / "junk.safetensors")])
    assert junk.exit_code == 2 and "not a readable safetensors file" in junk.stderr


def test_bench_opens_a_trainer_checkpoint(tmp_path):
    from dgc_convert.training.recipe import recipe_from_dict
    from dgc_convert.training.trainer import train

    recipe = recipe_from_dict(
        {
            "model": {"name": "resnet18"},
            "convert": {"zeta": 0.5},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.02},
            "data": {"dataset": "synthetic", "synthetic_size": 32, "image_size": 32},
            "output": {"directory": str(tmp_path / "run")},
        }
    )
    train(recipe)
    runner = CliRunner()
    for target in (tmp_path / "run" / "best", tmp_path / "run" / "last" / "model.safetensors"):
        result = runner.invoke(
            app, ["bench", str(target), "--repeats", "2", "--warmup", "1", "--engine", "eager", "--json"]
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["input_size"] == [3, 32, 32] and data["mac_ratio"] < 0.6
    refused = runner.invoke(app, ["bench", str(tmp_path / "run" / "best"), "--zeta", "0.3"])
    assert refused.exit_code == 2 and "applies to model names" in refused.stderr
    # killed between the two renames of a save: last/ is only the copy set aside, found as load finds it
    (tmp_path / "run" / "last").rename(tmp_path / "run" / ".last.old")
    result = runner.invoke(
        app, ["bench", str(tmp_path / "run" / "last"), "--repeats", "1", "--warmup", "1", "--engine", "eager"]
    )
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["bench", str(tmp_path / "run" / "gone")])
    assert missing.exit_code == 2 and missing.stderr == f"error: {tmp_path / 'run' / 'gone'}: no such file\n"


@LAYOUTS
def test_ties_are_broken_towards_the_lower_channel_in_every_path(interleaved):
    layer = DGCConv2d(16, 8, 3, padding=1, heads=2, zeta=0.5, interleaved=interleaved)
    with torch.no_grad():
        layer.saliency_generator.reduce.zero_()  # hidden units all zero: every score equals beta = 1
    x = torch.randn(3, 16, 6, 6)
    mask = layer.gates(x).mask
    assert mask[..., :8].all() and not mask[..., 8:].any()
    reference = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        for algorithm in ("gather_conv", "gather_bmm", "stacked", "masked", "export"):
            layer.inference_algorithm = algorithm
            torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5, msg=algorithm)


def test_equal_zero_scores_go_to_the_lower_channels_too():
    layer = DGCConv2d(16, 8, 3, padding=1, heads=2, zeta=0.5)
    scores = torch.zeros(3, 2, 16)
    scores[0, 0, 13] = 0.5  # one positive score: kept first, then the lowest zero-score channels
    index = layer.select(scores).sort(dim=2).values
    assert index[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 13]
    assert (index[1:] == torch.arange(8)).all() and (index[0, 1] == torch.arange(8)).all()
    with torch.no_grad():
        layer.saliency_generator.beta.fill_(-1.0)  # every score relu(negative) = 0: all tied at zero
    x = torch.randn(2, 16, 5, 5)
    mask = layer.gates(x).mask
    assert mask[..., :8].all() and not mask[..., 8:].any()
