"""ONNX export keeps the dynamic gating and matches PyTorch in onnxruntime."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dgc_convert.conversion.saved_models
from dgc_convert import convert, create_model, dgc_layers, save
from dgc_convert.cli import app
from dgc_convert.conversion.zoo import ModelInfo, attach_model_info
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.serving.export import ExportError, export_onnx, second_check_size, supported_opsets


def _trained_like(name, **convert_kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    convert(model, zeta=0.5, **convert_kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _dims(value):
    """An ONNX graph input/output's dims: named (dynamic) ones as str, fixed ones as int."""
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


# Only the last two stages are converted in the dynamic-size tests: they hold
# both kinds of DGC layer (strided 3x3 and the 1x1 shortcut) and their maps
# change size with the input (32 px -> 2x2 and 1x1, 64 px -> 4x4 and 2x2),
# while the export takes about half as long as with all 19 layers.
_LATE_STAGES = ["layer3.*", "layer4.*"]


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """A converted ResNet-18 (32x32 input) exported once with dynamic height and width."""
    model = _trained_like("resnet18", include=_LATE_STAGES)
    report = export_onnx(
        model, tmp_path_factory.mktemp("dynamic") / "r18.onnx", input_size=(3, 32, 32), dynamic_size=True
    )
    return model, report


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_export_parity_with_gating_kept(tmp_path, name):
    model = _trained_like(name)
    report = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(3, 32, 32))
    layers = len(dgc_layers(model))
    assert report.gating_ops.get("TopK") == layers and report.gating_ops.get("ScatterElements") == layers
    assert set(report.max_abs_diff) == {(1, 32, 32), (4, 32, 32)} and report.passed, report.max_abs_diff
    graph = onnx.load(str(report.path)).graph
    # The batch dimension stays dynamic; without dynamic size, height and width stay fixed ints.
    assert _dims(graph.input[0]) == ["batch", 3, 32, 32] and report.input_shape == ("batch", 3, 32, 32)
    assert not report.dynamic_size and report.checked_sizes == [(32, 32)]


def test_second_check_size_is_one_and_a_half_times_rounded_up_to_32():
    assert second_check_size(32, 32) == (64, 64)
    assert second_check_size(224, 224) == (352, 352)
    assert second_check_size(299, 160) == (480, 256)  # each side on its own: non-square stays non-square


def test_dynamic_size_parity_at_two_sizes(dynamic_export):
    model, report = dynamic_export
    layers = len(dgc_layers(model))
    assert layers == 10 and report.gating_ops.get("TopK") == layers
    assert report.checked_sizes == [(32, 32), (64, 64)]
    assert set(report.max_abs_diff) == {(b, s, s) for b in (1, 4) for s in (32, 64)}
    assert report.passed, report.max_abs_diff
    assert report.diffs_by_size()[1].startswith("64x64: batch 1 ")


def test_dynamic_size_graph_has_symbolic_height_and_width(dynamic_export):
    model, report = dynamic_export
    graph = onnx.load(str(report.path)).graph
    assert [value.name for value in graph.input] == ["input"] and [value.name for value in graph.output] == ["output"]
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"] and _dims(graph.output[0]) == ["batch", 10]
    assert report.dynamic_size and report.input_shape == ("batch", 3, "height", "width")
    # Height and width are independent: a non-square size the check did not use runs too.
    x = torch.randn(2, 3, 40, 56)
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


@pytest.mark.parametrize("size", [4, 2])
def test_interleaved_layer_exports_with_dynamic_size(tmp_path, size):
    """An interleaved layer (older files) adds the channel shuffle; stride 2 maps 4 px to 2, 2 px to 1."""
    torch.manual_seed(0)
    layer = DGCConv2d(16, 32, 3, padding=1, stride=2, heads=4, zeta=0.5).eval()
    layer.interleaved = True
    report = export_onnx(layer, tmp_path / "layer.onnx", input_size=(16, size, size), dynamic_size=True)
    assert report.dynamic_size and report.passed, report.max_abs_diff


def test_check_sizes_other_than_the_export_size_need_dynamic_size(tmp_path):
    with pytest.raises(ExportError, match="check size 64x64 differs from the export size 32x32"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "x.onnx", input_size=(3, 32, 32), check_sizes=[(32, 32), (64, 64)])
    assert not (tmp_path / "x.onnx").exists()  # refused before exporting


class _FlattenHead(nn.Module):
    """A head over the flattened 8x8 map: PyTorch itself cannot run it at another size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class _SizeBranch(nn.Module):
    """Runs at any size in PyTorch, but branches on the height: the exporter fixes it at 8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        out = self.conv(x).mean(dim=(2, 3))
        return out * 2 if x.shape[2] == 8 else out


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (_FlattenHead, "does not run at this size in PyTorch (RuntimeError: mat1 and mat2 shapes"),
        (_SizeBranch, "the exported graph takes only height 8 px"),
    ],
)
def test_a_model_that_needs_a_fixed_size_fails_in_one_line(tmp_path, module, reason):
    torch.manual_seed(0)
    with pytest.raises(ExportError) as caught:
        export_onnx(module().eval(), tmp_path / "fixed.onnx", input_size=(3, 8, 8), dynamic_size=True)
    message = str(caught.value)
    # 8 px -> 1.5x rounded up to a multiple of 32: the second size is 32x32.
    assert message.startswith("parity check at 32x32 (batch 1): ") and reason in message, message
    assert "\n" not in message


def test_export_command_reports_a_size_the_model_cannot_take_in_one_line(tmp_path, monkeypatch):
    def load(file):
        model = _FlattenHead()
        attach_model_info(model, ModelInfo("flatten_head", "torchvision", (3, 8, 8), 10))
        return model

    monkeypatch.setattr(dgc_convert.conversion.saved_models, "load", load)
    (tmp_path / "head.safetensors").touch()
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "head.safetensors"), "--onnx", str(tmp_path / "x.onnx"), "--dynamic-size"]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: parity check at 32x32 (batch 1): the model does not run")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_blocked_layers_export_without_the_channel_shuffle(tmp_path):
    """Blocked layers need no channel shuffle; interleaved ones (older files) add it as one Gather each, and both match."""
    model = _trained_like("resnet18")
    counts = {}
    for interleaved in (False, True):
        for _, layer in dgc_layers(model):
            layer.interleaved = interleaved
        report = export_onnx(model, tmp_path / f"r18-{interleaved}.onnx", input_size=(3, 32, 32))
        assert report.passed, report.max_abs_diff
        graph = onnx.load(str(report.path)).graph
        counts[interleaved] = {op: sum(node.op_type == op for node in graph.node) for op in ("Transpose", "Gather")}
        constants = {tensor.name for tensor in graph.initializer}
        counts[interleaved]["activation Gather"] = sum(
            node.op_type == "Gather" and node.input[0] not in constants for node in graph.node
        )
    # Blocked: one Transpose per layer, the saliency generator's (heads, batch) -> (batch, heads).
    # Interleaved: the relabelling is one Gather of the activations per layer (its weight's rows
    # in blocked order add Gathers on constants, not on the activations).
    layers = len(dgc_layers(model))
    assert counts[False]["Transpose"] == layers
    assert counts[True]["activation Gather"] - counts[False]["activation Gather"] == layers


def test_export_command(tmp_path):
    saved = save(_trained_like("resnet18"), tmp_path / "r18.safetensors", input_size=32)
    result = CliRunner().invoke(app, ["export", str(saved), "--onnx", str(tmp_path / "r18.onnx")])
    assert result.exit_code == 0, result.output
    assert "gating kept: 19 GatherElements, 19 ScatterElements, 19 TopK" in result.stdout
    assert "input 'input' (batch, 3, 32, 32) -> output 'output' (batch, 10)" in result.stdout
    assert "onnxruntime vs PyTorch max |difference| (tolerance" in result.stdout
    assert "  32x32: batch 1 " in result.stdout and "x64" not in result.stdout  # one size without --dynamic-size
    assert (tmp_path / "r18.onnx").is_file() and f"wrote {tmp_path / 'r18.onnx'}" in result.stdout
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "r18.onnx").st_mode & 0o777 == 0o666 & ~mask  # not a temporary file's 0600
    assert sorted(os.listdir(tmp_path)) == ["r18.onnx", "r18.safetensors"]  # no temporary file left
    missing = CliRunner().invoke(
        app, ["export", str(tmp_path / "none.safetensors"), "--onnx", str(tmp_path / "x.onnx")]
    )
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def _scores_median(model, x):
    """The median saliency score over every DGC layer of ``model`` for ``x``: a threshold
    that drops about half of the entries, so the threshold path really selects."""
    scores = []
    # Each layer's input, scored here: in eval mode the compiled op may compute
    # the scores itself, without calling the saliency generator module.
    hooks = [
        layer.register_forward_pre_hook(lambda layer, args: scores.append(layer.saliency(args[0]).flatten()))
        for _, layer in dgc_layers(model)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return float(torch.cat(scores).median())


def test_export_command_dynamic_size_with_network_gating(tmp_path):
    """DGC-G (Greater against T, ArgMax per head, Where) exports with dynamic size too; the CLI shows both sizes."""
    model = _trained_like("resnet18", gating="network", include=_LATE_STAGES)
    threshold = _scores_median(model, torch.randn(4, 3, 32, 32))
    for _, layer in dgc_layers(model):
        layer.set_threshold(threshold)
        assert layer.thresholded
    saved = save(model, tmp_path / "r18g.safetensors", input_size=32)
    result = CliRunner().invoke(app, ["export", str(saved), "--onnx", str(tmp_path / "r18g.onnx"), "--dynamic-size"])
    assert result.exit_code == 0, result.output
    assert "gating kept: 10 ArgMax, 10 ScatterElements" in result.stdout
    assert "input 'input' (batch, 3, height, width) -> output 'output' (batch, 10)" in result.stdout
    assert "  32x32: batch 1 " in result.stdout and "  64x64: batch 1 " in result.stdout
    graph = onnx.load(str(tmp_path / "r18g.onnx")).graph
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"]


def _flatten_head_loader(file):
    model = _FlattenHead()
    attach_model_info(model, ModelInfo("flatten_head", "torchvision", (3, 8, 8), 10))
    return model


def _old_file(tmp_path):
    """An existing --onnx target, and the saved-model file the (monkeypatched) load reads."""
    (tmp_path / "head.safetensors").touch()
    out = tmp_path / "x.onnx"
    out.write_bytes(b"the old export")
    return out


@pytest.mark.parametrize("value", ["0", "-1e-4", "nan", "inf"])
def test_export_command_refuses_a_bad_tolerance_before_loading(tmp_path, value):
    # The model file does not exist: the tolerance is refused first.
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "none.safetensors"), "--onnx", str(tmp_path / "x.onnx"), "--tolerance", value]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: tolerance must be a finite number above 0, got ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("opset", [12, 99])
def test_export_command_refuses_an_opset_outside_the_supported_range(tmp_path, opset):
    lowest, highest = supported_opsets()
    assert lowest == 13 and 18 <= highest < 99
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "none.safetensors"), "--onnx", str(tmp_path / "x.onnx"), "--opset", str(opset)]
    )
    assert result.exit_code == 2, result.output
    assert f"opset {opset} is not supported" in result.stderr
    assert f"supports opsets {lowest} to {highest}" in result.stderr and result.stderr.count("\n") == 1


def test_export_onnx_checks_its_options_before_exporting(tmp_path):
    for kwargs, message in [({"tolerance": math.nan}, "tolerance must be"), ({"opset": 7}, "opset 7 is not")]:
        with pytest.raises(ExportError, match=message):
            export_onnx(_FlattenHead().eval(), tmp_path / "x.onnx", input_size=(3, 8, 8), **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_failed_parity_check_writes_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    class Off(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [output + 1.0 for output in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    out = _old_file(tmp_path)
    torch.manual_seed(0)
    report = export_onnx(_FlattenHead().eval(), out, input_size=(3, 8, 8))
    assert not report.passed and not report.written
    assert out.read_bytes() == b"the old export" and sorted(os.listdir(tmp_path)) == ["head.safetensors", "x.onnx"]

    monkeypatch.setattr(dgc_convert.conversion.saved_models, "load", _flatten_head_loader)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "head.safetensors"), "--onnx", str(out)])
    assert result.exit_code == 1, result.output
    assert "wrote" not in result.stdout and f"not written to {out}" in result.stdout
    assert result.stderr.startswith(f"error: {out}: not written (the existing file is kept): onnxruntime output")
    assert result.stderr.count("\n") == 1
    assert out.read_bytes() == b"the old export" and sorted(os.listdir(tmp_path)) == ["head.safetensors", "x.onnx"]
    (tmp_path / "new").mkdir()
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "head.safetensors"), "--onnx", str(tmp_path / "new/y.onnx")]
    )
    assert result.exit_code == 1 and "not written (nothing was written)" in result.stderr
    assert os.listdir(tmp_path / "new") == []


def test_a_full_disk_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    monkeypatch.setattr(onnx, "save_model", full_disk)
    out = _old_file(tmp_path)
    with pytest.raises(OSError, match="No space left on device"):
        export_onnx(_FlattenHead().eval(), out, input_size=(3, 8, 8))
    assert out.read_bytes() == b"the old export" and sorted(os.listdir(tmp_path)) == ["head.safetensors", "x.onnx"]

    monkeypatch.setattr(dgc_convert.conversion.saved_models, "load", _flatten_head_loader)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "head.safetensors"), "--onnx", str(out)])
    assert result.exit_code == 1, result.output  # a full disk is the run failing, not bad input
    assert result.stderr == f"error: {out}: not written (the existing file is kept): No space left on device\n"
    assert "wrote" not in result.stdout
    assert out.read_bytes() == b"the old export" and sorted(os.listdir(tmp_path)) == ["head.safetensors", "x.onnx"]
