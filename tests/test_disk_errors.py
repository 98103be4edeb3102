"""Writing where the disk refuses: one line naming the path, exit 1 for a full disk, 2 for a bad path,
and nothing half-written left behind. Real tmpfs mounts where the tests run as root (skipped otherwise;
the writers' own simulated failures are tested in test_atomic, test_serialize and test_export)."""

from __future__ import annotations

import os

import pytest
from test_cli_train import write_small_recipe  # pytest puts tests/ on the path
from typer.testing import CliRunner

from dgc_convert import save
from dgc_convert.cli import app
from dgc_convert.files.atomic import atomic_write, make_directory

runner = CliRunner()


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output and "internal error" not in result.output, result.output
    return lines[0]


def _hidden(directory) -> list[str]:
    """Temporary files and directories (dot names) anywhere under ``directory``."""
    return [name for _, dirs, files in os.walk(directory) for name in dirs + files if name.startswith(".")]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, late_dgc_resnet18):
    return save(late_dgc_resnet18, tmp_path_factory.mktemp("saved") / "m.safetensors", input_size=32)


def test_save_to_a_full_disk_is_one_line_exit_1_and_leaves_nothing(small_disk):
    target = small_disk / "r18.safetensors"
    line = _one_line(runner.invoke(app, ["resnet18", "--input-size", "32", "--save", str(target)]), 1)
    assert line == f"error: {target}: No space left on device"
    assert os.listdir(small_disk) == []


def test_training_onto_a_full_disk_stops_in_one_line_with_no_temporary_checkpoint(tmp_path, small_disk):
    recipe = write_small_recipe(tmp_path)
    output = small_disk / "run"
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output.directory={output}"])
    line = _one_line(result, 1)
    # the first checkpoint (about 2 MB) is what fills the 512 KiB disk
    assert line in (
        f"error: {output / 'best'}: No space left on device",
        f"error: {output / 'last'}: No space left on device",
    )
    assert _hidden(output) == []  # no .last.tmp-<pid>, no .lock
    assert (output / "recipe.yaml").is_file() and (output / "metrics.jsonl").is_file()


def test_inspect_onto_a_full_disk_is_one_line_exit_1(saved_model, small_disk):
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # leave the heat maps no room at all
        with pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    out = small_disk / "heat"
    result = runner.invoke(app, ["inspect", str(saved_model), "--data", "synthetic", "--out", str(out)])
    line = _one_line(result, 1)
    assert line.startswith(f"error: {out}") and line.endswith(": No space left on device")
    assert _hidden(small_disk) == []


def test_writing_to_a_read_only_disk_is_one_line_exit_2(tmp_path, saved_model, read_only_disk):
    target = read_only_disk / "r18.safetensors"
    line = _one_line(runner.invoke(app, ["resnet18", "--input-size", "32", "--save", str(target)]), 2)
    assert line == f"error: {target}: Read-only file system"  # the file asked for, not a temporary one
    recipe = write_small_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output.directory={read_only_disk / 'run'}"])
    assert _one_line(result, 2).endswith("Read-only file system")
    result = runner.invoke(
        app, ["inspect", str(saved_model), "--data", "synthetic", "--out", str(read_only_disk / "heat")]
    )
    assert _one_line(result, 2).endswith("Read-only file system")
    result = runner.invoke(app, ["export", str(saved_model), "--onnx", str(read_only_disk / "m.onnx")])
    assert _one_line(result, 2).endswith("Read-only file system")


def test_a_file_where_a_directory_is_needed_is_named(tmp_path, saved_model):
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("not a directory")
    expected = f"error: {in_the_way}: a file, where a directory is needed"
    assert (
        _one_line(runner.invoke(app, ["resnet18", "--input-size", "32", "--save", f"{in_the_way}/x.safetensors"]), 2)
        == expected
    )
    recipe = write_small_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output.directory={in_the_way}/run"])
    assert _one_line(result, 2) == expected
    result = runner.invoke(app, ["inspect", str(saved_model), "--data", "synthetic", "--out", f"{in_the_way}/heat"])
    assert _one_line(result, 2) == expected
    assert in_the_way.read_text() == "not a directory"


def test_make_directory_names_the_file_in_the_way(tmp_path):
    (tmp_path / "a").write_text("")
    with pytest.raises(NotADirectoryError) as raised:
        make_directory(tmp_path / "a" / "b" / "c")
    assert raised.value.filename == str(tmp_path / "a")
    assert make_directory(tmp_path / "x" / "y") == tmp_path / "x" / "y" and (tmp_path / "x" / "y").is_dir()


def test_a_writer_failing_without_a_file_name_is_named_after_the_target(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as raised:
        with atomic_write(target):
            raise OSError(28, "No space left on device")  # what a file object's write() raises
    assert raised.value.filename == str(target) and raised.value.errno == 28
    assert os.listdir(tmp_path) == []


def test_exit_codes_bad_paths_are_bad_input_everything_else_a_failed_run():
    import errno

    from dgc_convert.cli.exits import EXIT_BAD_INPUT, EXIT_RUN_FAILED, os_error_exit

    for code in (errno.EACCES, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        assert os_error_exit(OSError(code, "x")) == EXIT_BAD_INPUT
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE):
        assert os_error_exit(OSError(code, "x")) == EXIT_RUN_FAILED
    assert os_error_exit(OSError("no errno")) == EXIT_RUN_FAILED


def test_export_to_a_full_disk_keeps_the_old_file(saved_model, small_disk):
    """The acceptance's tmpfs case: a 512 KiB disk cannot take the ResNet-18 graph (about 45 MB)."""
    out = small_disk / "m.onnx"
    out.write_bytes(b"the old export")
    result = runner.invoke(app, ["export", str(saved_model), "--onnx", str(out)])
    line = _one_line(result, 1)
    assert line == f"error: {out}: not written (the existing file is kept): No space left on device"
    assert out.read_bytes() == b"the old export" and os.listdir(small_disk) == ["m.onnx"]
