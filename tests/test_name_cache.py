"""Resolving a known model name needs no import of timm or torchvision once their lists are cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgc_convert.conversion.name_cache import CACHE_DIR_VARIABLE, cache_directory, cached_names
from dgc_convert.conversion.zoo import resolve
from dgc_convert.errors import UnknownModelError

ROOT = Path(__file__).resolve().parents[1]

# Resolve NAME in a fresh interpreter; print the library and the heavy modules it imported.
_PROBE = """
import sys
from dgc_convert.conversion.zoo import resolve
name, library, _ = resolve(sys.argv[1])
heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
print(library, ",".join(heavy) or "-")
"""


def _resolve_in_child(name: str, cache: Path) -> tuple[str, str]:
    env = {**os.environ, CACHE_DIR_VARIABLE: str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, name], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    library, heavy = done.stdout.split()
    return library, heavy


def test_a_known_name_resolves_from_the_cache_without_importing_the_libraries(tmp_path: Path) -> None:
    # The first run asks the libraries and writes both lists; later runs read them only.
    assert _resolve_in_child("resnet18d", tmp_path) == ("timm", "timm,torch,torchvision")
    assert sorted(p.name.split("-")[2] for p in tmp_path.iterdir()) == ["timm", "torchvision"]
    assert _resolve_in_child("resnet18", tmp_path) == ("torchvision", "-")
    assert _resolve_in_child("resnet18d", tmp_path) == ("timm", "-")


def test_a_timm_tag_resolves_from_the_cache_too(tmp_path: Path) -> None:
    assert _resolve_in_child("resnet18.a1_in1k", tmp_path) == ("timm", "timm,torch,torchvision")
    assert _resolve_in_child("resnet18.a1_in1k", tmp_path) == ("timm", "-")


def test_auto_prefers_torchvision_even_when_only_timm_is_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    from importlib.metadata import version

    (tmp_path / f"model-names-timm-{version('timm')}.json").write_text(json.dumps(["resnet18"]))
    # No torchvision list: the libraries decide, and torchvision builds resnet18.
    assert resolve("resnet18") == ("resnet18", "torchvision", True)
    assert resolve("resnet18", "timm") == ("resnet18", "timm", False)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"names": 1}), json.dumps([1, 2])])
def test_an_unreadable_cache_is_ignored_and_rewritten(tmp_path: Path, monkeypatch, content: str) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    from importlib.metadata import version

    file = tmp_path / f"model-names-torchvision-{version('torchvision')}.json"
    file.write_text(content)
    assert cached_names("torchvision") is None
    assert resolve("resnet18") == ("resnet18", "torchvision", True)
    assert "resnet18" in (cached_names("torchvision") or set())


def test_an_unwritable_cache_directory_is_no_error(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(blocker / "cache"))
    assert resolve("resnet18") == ("resnet18", "torchvision", True)
    assert cached_names("torchvision") is None


def test_an_unknown_name_still_gets_suggestions_from_the_libraries(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(UnknownModelError, match="did you mean .*resnet18"):
        resolve("resnet81")


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_DIR_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_directory() == tmp_path / "dgc-convert"
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    assert cache_directory() == tmp_path / "mine"
