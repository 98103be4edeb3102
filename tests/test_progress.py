"""Progress of long calls: the steps the library reports, and how the CLI shows them."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dgc_convert import create_model
from dgc_convert.cli import app
from dgc_convert.conversion.settings import ConvertSection, ModelSection
from dgc_convert.display import StepProgress
from dgc_convert.measuring.bench import benchmark
from dgc_convert.measuring.conversion_summary import summarize_conversion
from dgc_convert.measuring.evaluate import evaluate
from dgc_convert.measuring.gate_usage import channel_usage
from dgc_convert.progress import NO_PROGRESS, tracked
from dgc_convert.serving.export import export_onnx
from dgc_convert.training.data import build_data
from dgc_convert.training.recipe import DataSection


class Recorder:
    """Keeps every step as [description, total, units advanced]."""

    def __init__(self) -> None:
        self.steps: list[list] = []

    def step(self, description: str, total: int | None = None) -> None:
        self.steps.append([description, total, 0])

    def advance(self, amount: int = 1) -> None:
        assert self.steps, "advance before any step"
        self.steps[-1][2] += amount

    def named(self, start: str) -> list:
        return next(step for step in self.steps if step[0].startswith(start))


@pytest.fixture(scope="module")
def model(late_dgc_resnet18):
    return late_dgc_resnet18


@pytest.fixture(scope="module")
def held_out():
    section = DataSection(dataset="synthetic", synthetic_size=40, augmentation="none")
    return build_data(section, image_size=32, num_classes=10, seed=0).val


def test_tracked_counts_what_has_a_length_and_pulses_what_has_none():
    recorder = Recorder()
    assert list(tracked([1, 2, 3], recorder, "list")) == [1, 2, 3]
    assert list(tracked(iter([1, 2]), recorder, "iterator")) == [1, 2]
    assert recorder.steps == [["list", 3, 3], ["iterator", None, 2]]


def test_no_progress_accepts_everything_and_does_nothing():
    NO_PROGRESS.step("anything", 3)
    NO_PROGRESS.advance(2)


def test_evaluate_and_channel_usage_report_every_batch(model, held_out):
    samples = len(held_out)
    batches = math.ceil(samples / 16)
    recorder = Recorder()
    evaluate(model, held_out, batch_size=16, progress=recorder)
    assert recorder.named("evaluating")[1:] == [batches, batches]
    assert recorder.steps[0][0] == "counting static MACs per sample"  # also sizes the batches' memory
    recorder = Recorder()
    channel_usage(model, held_out, batch_size=16, progress=recorder)
    assert recorder.named("recording")[1:] == [batches, batches]


def test_export_reports_its_steps_and_each_parity_check(tmp_path, model):
    recorder = Recorder()
    report = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32), progress=recorder)
    assert report.written
    names = [step[0] for step in recorder.steps]
    assert names[0] == "running the model in PyTorch at 32x32"
    assert names[1].startswith("exporting to ONNX (opset 18")
    assert recorder.named("checking onnxruntime")[1:] == [2, 2]  # batches 1 and 4 at one size


def test_benchmark_reports_warm_up_and_every_timed_run(model):
    recorder = Recorder()
    dense = create_model("resnet18", num_classes=10).eval()
    benchmark(dense, model, input_size=32, repeats=2, warmup=1, layers=True, engine="eager", progress=recorder)
    warm, timing = recorder.named("warming up"), recorder.named("timing ")
    variants = warm[1]
    assert variants == 5  # three dense layouts, masked and sparse
    assert warm[2] == variants
    assert timing[1:] == [2 * variants, 2 * variants]
    assert recorder.steps[-1][0] == "timing every layer"


def test_summarize_conversion_reports_build_count_and_check_in_order():
    recorder = Recorder()
    summarize_conversion(ModelSection(name="resnet18", input_size=32), ConvertSection(), check=True, progress=recorder)
    assert [step[0] for step in recorder.steps] == [
        "building and converting resnet18",
        "counting MACs per sample at 32x32",
        "checking the converted model equals the original at zeta 0",
    ]


def _terminal(width: int = 100) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=width), out


def test_step_progress_draws_steps_on_a_terminal_and_clears_them():
    console, out = _terminal()
    with StepProgress(console) as progress:
        progress.step("first step")
        progress.step("counted step", 5)
        progress.advance(3)
    drawn = out.getvalue()
    assert "counted step" in drawn and "3/5" in drawn
    # transient: the cursor is shown again, then the drawn line is erased (up one line, clear it)
    assert drawn.endswith("\x1b[?25h\r\x1b[1A\x1b[2K")


def test_step_progress_writes_nothing_off_a_terminal():
    out = io.StringIO()
    with StepProgress(Console(file=out, force_terminal=False)) as progress:
        progress.step("a step", 2)
        progress.advance()
    assert out.getvalue() == ""


def _on_a_terminal(*args: str) -> tuple[int, bytes, bytes]:
    """Run ``dgc-convert ARGS`` with stderr a terminal and stdout a pipe: (exit code, stdout, what the terminal got)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dgc_convert.cli", *args], stdout=subprocess.PIPE, stderr=follower, env=env
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = process.communicate(timeout=120)
    os.close(leader)
    return process.returncode, stdout, shown


def test_the_cli_shows_steps_on_a_terminal_stderr_and_keeps_stdout_json():
    """stderr a terminal, stdout a pipe (``dgc-convert ... --json | jq``): steps on stderr, JSON intact."""
    code, stdout, shown = _on_a_terminal("resnet18", "--input-size", "32", "--check", "--json")
    assert code == 0
    assert json.loads(stdout)["check"]["passed"] is True
    assert b"checking the converted model equals the original" in shown


def test_an_error_inside_a_step_is_printed_after_the_progress_line_is_erased(tmp_path, model):
    """Printed while the line is shown, the error would be erased with it."""
    from dgc_convert import save

    path = save(model, tmp_path / "m.safetensors", input_size=32)
    code, _, shown = _on_a_terminal("eval", str(path), "--data", "bogus")
    assert code == 2
    assert b"loading " in shown  # the progress line was drawn
    erased = shown.rindex(b"\x1b[2K")  # the last erase is the progress line going
    assert b"error: --data 'bogus'" in shown[erased:].replace(b"\x1b[31m", b"").replace(b"\x1b[0m", b"")


def test_no_progress_on_stderr_when_it_is_not_a_terminal():
    result = CliRunner().invoke(app, ["resnet18", "--input-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_step_progress_shows_brackets_as_text_and_can_be_entered_again():
    console, out = _terminal()
    progress = StepProgress(console)
    with progress:
        progress.step("loading runs/[/best]/m.safetensors", 2)  # rich markup would choke on it
        progress.advance()
    with progress:  # a second use starts clean
        progress.step("second use", 1)
        progress.advance()
    drawn = out.getvalue()
    assert "loading runs/[/best]/m.safetensors" in drawn and "second use" in drawn and "1/1" in drawn
