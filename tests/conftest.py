"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from dgc_convert.conversion.name_cache import CACHE_DIR_VARIABLE


@pytest.fixture(autouse=True, scope="session")
def _model_name_cache(tmp_path_factory):
    """The model-name lists the tests write go to a directory of this session, not the user's cache
    (child processes inherit the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("model-name-cache")))
        yield


@pytest.fixture
def library_calls(monkeypatch):
    """What the libraries' own constructors are asked for (pretrained / weights), with no download."""
    import timm
    import torchvision

    calls: list[tuple[str, object]] = []
    build_torchvision, build_timm = torchvision.models.get_model, timm.create_model

    def torchvision_get_model(name, **kwargs):
        calls.append(("torchvision", kwargs.get("weights")))
        return build_torchvision(name, **{**kwargs, "weights": None})

    def timm_create_model(name, **kwargs):
        calls.append(("timm", kwargs.get("pretrained")))
        return build_timm(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(torchvision.models, "get_model", torchvision_get_model)
    monkeypatch.setattr(timm, "create_model", timm_create_model)
    return calls


def _mounted_tmpfs(tmp_path, name: str, options: str):
    """A tmpfs at tmp_path/name with mount ``options`` (root with mount rights only; else skip)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real tmpfs needs root and mount(8)")
    mount_point = tmp_path / name
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    return mount_point


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 512 KiB tmpfs: small files fit, a model's weights fill it (ENOSPC)."""
    import subprocess

    mount_point = _mounted_tmpfs(tmp_path, "small-disk", "size=512k")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    """A directory on a read-only tmpfs (EROFS, which even root cannot write)."""
    import subprocess

    mount_point = _mounted_tmpfs(tmp_path, "read-only", "size=64k,ro")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def late_dgc_resnet18():
    """ResNet-18 (10 classes) with only its last stage converted (zeta 0.5), in eval mode: quick to run."""
    import torch

    from dgc_convert import convert, create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    convert(model, zeta=0.5, include=["layer4.*"])
    return model.eval()
