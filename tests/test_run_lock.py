"""One run per output directory: the run lock refuses a second run, takes over stale locks, always releases."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from test_cli_train import write_small_recipe  # pytest puts tests/ on the path: one tiny recipe for both
from typer.testing import CliRunner

from dgc_convert.cli import app
from dgc_convert.errors import DGCConvertError
from dgc_convert.files.names import LOCK_FILE
from dgc_convert.training.checkpoint import read_checkpoint
from dgc_convert.training.run_lock import RunLock, RunLockedError, run_lock
from dgc_convert.training.trainer import train

runner = CliRunner()


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_into_a_live_runs_directory_is_refused_in_one_line_touching_nothing(tmp_path):
    recipe = write_small_recipe(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    assert not (run / LOCK_FILE).exists()  # released at the end
    with run_lock(run) as lock:  # a live run (this process) holds the directory
        assert lock is not None
        before = snapshot(run)
        for args in (["train", str(recipe)], ["train", str(recipe), "--resume"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2 and result.stdout == "", result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.output
            holder = json.loads((run / LOCK_FILE).read_text())
            assert lines[0].startswith(f"error: {run}: another run is training into this directory")
            assert f"pid {holder['pid']} on {socket.gethostname()}, started {holder['started']}" in lines[0]
            assert snapshot(run) == before  # recipe.yaml, metrics.jsonl, checkpoints: untouched
    assert not (run / LOCK_FILE).exists()


def test_a_fresh_directory_is_not_even_created_around_a_refusal(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError) as refused:
            RunLock(run).acquire()
        assert isinstance(refused.value, DGCConvertError) and "\n" not in str(refused.value)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_a_stale_lock_from_a_dead_process_is_taken_over_with_one_line(tmp_path, capsys):
    recipe = write_small_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00"}
    (run / LOCK_FILE).write_text(json.dumps(stale))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "stale lock" in line]
    assert notes == [
        f"{run / LOCK_FILE}: taking over a stale lock (pid {stale['pid']} on {stale['host']} is no longer running)"
    ]
    assert not (run / LOCK_FILE).exists()
    assert read_checkpoint(run / "last").state["status"] == "finished"


def test_a_lock_from_another_host_or_a_garbled_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "yesterday"}))
    with pytest.raises(RunLockedError, match=f"on elsewhere, started yesterday.*delete {run / LOCK_FILE}"):
        RunLock(run).acquire()  # no way to tell whether it is alive there: never stolen
    (run / LOCK_FILE).write_text("{not json")
    notes: list[str] = []
    with run_lock(run, notify=notes.append):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] > 0
    assert notes == [f"{run / LOCK_FILE}: taking over a stale lock (unreadable lock file)"]


def test_the_lock_is_released_after_an_exception_and_a_keyboard_interrupt(tmp_path, monkeypatch):
    recipe = write_small_recipe(tmp_path)
    run = tmp_path / "run"

    class Boom:
        def __init__(self, error):
            self.error = error

        def on_iteration_end(self, control, iteration):
            raise self.error

    with pytest.raises(RuntimeError, match="boom"):
        train(_recipe(recipe), callbacks=[Boom(RuntimeError("boom"))])
    assert not (run / LOCK_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        train(_recipe(recipe), callbacks=[Boom(KeyboardInterrupt())])
    assert not (run / LOCK_FILE).exists()
    # A refused run releases nothing it does not hold.
    with run_lock(run):
        with pytest.raises(RunLockedError):
            train(_recipe(recipe))
        assert (run / LOCK_FILE).exists()


def test_a_released_lock_that_another_run_took_over_is_left_alone(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    lock.release()
    assert json.loads((run / LOCK_FILE).read_text())["host"] == "elsewhere"


def _recipe(path):
    from dgc_convert.training.recipe import load_recipe

    return load_recipe(path)
