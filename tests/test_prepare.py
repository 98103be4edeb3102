"""prepare_for_inference engines: packed eager convolutions, the compiled model, the report."""

import copy
import pickle

import pytest
import torch
from torch import nn

from dgc_convert import DGCConv2d, convert, create_model
from dgc_convert.measuring.bench import benchmark
from dgc_convert.serving.prepare import PackedConv2d, prepare_for_inference


def _converted_resnet18():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    convert(model, zeta=0.75)
    model.train()
    with torch.no_grad():  # real running statistics for the folded BatchNorms
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def test_eager_engine_packs_convolutions_and_keeps_outputs():
    model = _converted_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    report = prepare_for_inference(model)
    assert report.engine == "eager" and report.model is model and report.channels_last
    assert report.packed >= 1 and isinstance(model.conv1, PackedConv2d) and report.dgc_layers > 0
    with torch.inference_mode():
        for inputs in (x, x.contiguous(memory_format=torch.channels_last)):  # either layout, same outputs
            assert _relative_error(report.model(inputs), expected) < 1e-4
    copied = copy.deepcopy(model)  # the packed oneDNN weight is rebuilt, not copied
    with torch.no_grad():
        assert _relative_error(copied(x), expected) < 1e-4
    assert "_packed" not in pickle.loads(pickle.dumps(model.conv1)).__dict__


def test_packed_convolution_follows_weight_changes_and_gradients():
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2).eval()
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x))
        packed.weight.mul_(2.0)
        conv.weight.mul_(2.0)
        torch.testing.assert_close(packed(x), conv(x))
    packed(x).sum().backward()  # grad mode: the ordinary convolution, with autograd
    assert packed.weight.grad is not None


def test_compile_engine_equals_eager():
    model = _converted_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    report = prepare_for_inference(model, "compile", example_input=x)
    assert report.engine == "compile" and report.model is not model
    assert report.compile_seconds is not None and 0 < report.compile_seconds < 60
    assert report.dgc_in_graph in ("custom op", "eager (one graph break per layer)")
    with torch.no_grad():
        out = report.model(x.contiguous(memory_format=torch.channels_last))
    assert _relative_error(out, expected) < 1e-4


def test_bad_engines_are_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        prepare_for_inference(nn.Sequential(nn.Conv2d(3, 4, 3)), "jit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine must be one of"):
        benchmark(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), engine="jit")


def test_threads_are_restored_after_a_failure():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError):  # the input does not fit the model
        benchmark(nn.Conv2d(5, 4, 3), nn.Conv2d(5, 4, 3), input_size=8, threads=1, engine="eager", repeats=1, warmup=1)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "settings, threshold",
    [({"preact": True}, None), ({"preact": True, "gating": "network"}, 1.0), ({"gating": "network"}, 1.0)],
    ids=["preact", "preact-network", "network"],
)
def test_preact_and_network_gated_models_fold_and_keep_their_outputs(settings, threshold):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    convert(model, zeta=0.5, **settings)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics: the mean over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, DGCConv2d)]
    if threshold is not None:
        for layer in layers:
            layer.set_threshold(threshold)  # a nonzero T: the threshold, not k, selects
        assert all(layer.thresholded for layer in layers)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    report = prepare_for_inference(model)
    # Every block BatchNorm follows a convolution (dense or DGC) and folds; a preact
    # layer's own norm, which runs before its convolution, is kept as it is.
    assert len(report.folded) == 20 and not report.not_folded
    assert all(isinstance(layer.norm, nn.BatchNorm2d) == settings.get("preact", False) for layer in layers)
    with torch.inference_mode():
        assert _relative_error(model(x), expected) < 1e-4
