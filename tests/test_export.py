"""ONNX export keeps the dynamic gating and matches PyTorch in onnxruntime."""

from __future__ import annotations

import onnx
import pytest
import torch
from typer.testing import CliRunner

from dgc_convert import convert, create_model, dgc_layers, save
from dgc_convert.cli import app
from dgc_convert.export import export_onnx


def _trained_like(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    convert(model, zeta=0.5)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_export_parity_with_gating_kept(tmp_path, name):
    model = _trained_like(name)
    report = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(3, 32, 32))
    layers = len(dgc_layers(model))
    assert report.gating_ops.get("TopK") == layers and report.gating_ops.get("ScatterElements") == layers
    assert set(report.max_abs_diff) == {1, 4} and report.passed, report.max_abs_diff
    graph = onnx.load(str(report.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension stays dynamic


def test_blocked_layers_export_without_the_channel_shuffle(tmp_path):
    """Blocked layers need no Reshape/Transpose shuffle; interleaved ones (older files) keep it, and both match."""
    model = _trained_like("resnet18")
    transposes = {}
    for interleaved in (False, True):
        for _, layer in dgc_layers(model):
            layer.interleaved = interleaved
        report = export_onnx(model, tmp_path / f"r18-{interleaved}.onnx", input_size=(3, 32, 32))
        assert report.passed, report.max_abs_diff
        graph = onnx.load(str(report.path)).graph
        transposes[interleaved] = sum(node.op_type == "Transpose" for node in graph.node)
    # Blocked: one Transpose per layer, the saliency generator's (heads, batch) -> (batch, heads).
    # Interleaved layers add at least the shuffle's.
    layers = len(dgc_layers(model))
    assert transposes[False] == layers and transposes[True] >= 2 * layers


def test_export_command(tmp_path):
    saved = save(_trained_like("resnet18"), tmp_path / "r18.safetensors", input_size=32)
    result = CliRunner().invoke(app, ["export", str(saved), "--onnx", str(tmp_path / "r18.onnx")])
    assert result.exit_code == 0, result.output
    assert "gating kept: 19 GatherElements, 19 ScatterElements, 19 TopK" in result.stdout
    assert "onnxruntime vs PyTorch max |difference|: batch 1:" in result.stdout
    assert (tmp_path / "r18.onnx").is_file()
    missing = CliRunner().invoke(
        app, ["export", str(tmp_path / "none.safetensors"), "--onnx", str(tmp_path / "x.onnx")]
    )
    assert missing.exit_code == 2 and "no such file" in missing.stderr
