"""export_onnx returns an ExportReport for every normal outcome (passed or not) and raises only for failures."""

from __future__ import annotations

import dataclasses
import os

import onnxruntime
import pytest
import torch
from torch import nn

from dgc_convert import convert, dgc_layers
from dgc_convert.serving.export import ExportError, ExportReport, export_onnx
from dgc_convert.serving.onnx_parity import check_parity

# The fields the CLI's export command prints, in the report's order.
REPORT_FIELDS = [
    "path",
    "opset",
    "gating_ops",
    "max_abs_diff",
    "tolerance",
    "input_name",
    "input_shape",
    "output_name",
    "output_shape",
    "written",
]


def small_dgc_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    convert(model, zeta=0.5, input_size=(3, 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_dgc_net()
    path = tmp_path_factory.mktemp("export") / "net.onnx"
    return model, path, export_onnx(model, path, input_size=(3, 16, 16), opset=18, tolerance=1e-4)


def test_a_passing_export_reports_every_field_the_cli_prints(exported):
    model, path, report = exported
    assert isinstance(report, ExportReport)
    assert [f.name for f in dataclasses.fields(report)] == REPORT_FIELDS
    layers = len(dgc_layers(model))
    assert layers == 2 and report.gating_ops["TopK"] == layers and report.gating_ops["ScatterElements"] == layers
    assert report.path == path and report.opset == 18
    assert set(report.max_abs_diff) == {(1, 16, 16), (4, 16, 16)} and report.checked_sizes == [(16, 16)]
    assert report.tolerance >= 1e-4  # relative: 1e-4 times the output scale (at least 1)
    assert (report.input_name, report.input_shape) == ("input", ("batch", 3, 16, 16))
    assert (report.output_name, report.output_shape) == ("output", ("batch", 5))
    assert report.passed and report.written and path.is_file()
    assert os.listdir(path.parent) == ["net.onnx"]  # no temporary left


def test_a_failed_parity_check_is_a_report_not_an_exception(tmp_path, monkeypatch):
    class Off(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [output + 1.0 for output in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    report = export_onnx(small_dgc_net(), tmp_path / "net.onnx", input_size=(3, 16, 16))
    assert not report.passed and not report.written
    assert all(diff >= 1.0 - 1e-5 for diff in report.max_abs_diff.values())
    assert report.input_shape == ("batch", 3, 16, 16) and report.gating_ops["TopK"] == 2
    assert os.listdir(tmp_path) == []


def test_the_parity_step_alone_measures_every_size_and_batch(exported):
    model, path, report = exported
    parity = check_parity(model, path, channels=3, sizes=[(16, 16)], batches=(1, 2, 3), traced=(16, 16), pinned={})
    assert set(parity.max_abs_diff) == {(1, 16, 16), (2, 16, 16), (3, 16, 16)} and parity.scale >= 1.0
    assert max(parity.max_abs_diff.values()) <= report.tolerance
    with pytest.raises(
        ExportError, match=r"^parity check at 32x16 \(batch 1\): the exported graph takes only height 16"
    ):
        check_parity(model, path, channels=3, sizes=[(32, 16)], batches=(1,), traced=(16, 16), pinned={"height": 16})
