"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


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
