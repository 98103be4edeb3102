"""atomic_write: the old file or the new one, never a part; the usual permissions; no temporary files left."""

from __future__ import annotations

import os
import stat

import pytest

from dgc_convert.files.atomic import atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replaces_the_file_with_the_umask_mode_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "out.bin"  # a missing directory is created
    with atomic_write(path) as temporary:
        assert temporary.parent == path.parent and temporary.exists() and not path.exists()
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o666 & ~_umask()
    assert os.listdir(path.parent) == ["out.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask_even_when_the_writer_narrows_it(tmp_path, mask):
    previous = os.umask(mask)
    try:
        with atomic_write(tmp_path / "out.bin") as temporary:
            temporary.write_bytes(b"x")
            os.chmod(temporary, 0o600)  # as safetensors and tempfile.mkstemp do
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "out.bin") == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"), atomic_write(path) as temporary:
        temporary.write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_interrupt_keeps_the_old_file_too(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as temporary:
        temporary.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_failing_rename_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), atomic_write(path) as temporary:
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_temporary_file_left_by_a_killed_writer_is_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    dead = tmp_path / f".m.bin.{gone.pid}-deadbeef.tmp"
    alive = tmp_path / f".m.bin.{os.getpid()}-0123abcd.tmp"  # a write under way in this process
    other = tmp_path / f".other.bin.{gone.pid}-deadbeef.tmp"  # another target's: not ours to judge
    for leftover in (dead, alive, other):
        leftover.write_bytes(b"half a file")
    with atomic_write(tmp_path / "m.bin") as temporary:
        temporary.write_bytes(b"new")
    assert (tmp_path / "m.bin").read_bytes() == b"new"
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_temporary_beside_is_moved_into_place_only_when_asked(tmp_path):
    from dgc_convert.files.atomic import move_into_place, temporary_beside

    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with temporary_beside(path) as temporary:
        temporary.write_bytes(b"rejected")  # not moved: the block ends without a rename
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with temporary_beside(path) as temporary:
        temporary.write_bytes(b"accepted")
        move_into_place(temporary, path)
    assert path.read_bytes() == b"accepted" and _mode(path) == 0o666 & ~_umask()
    assert os.listdir(tmp_path) == ["out.bin"]
