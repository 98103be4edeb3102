"""Pretrained weights without a network: seconds, not a minute of retries, and one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dgc_convert.conversion.network import unreachable


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_host_is_unreachable_with_its_reason(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    reason = unreachable(f"http://127.0.0.1:{_closed_port()}")
    assert reason is not None and reason.startswith("127.0.0.1: ") and "refused" in reason.lower()


def test_a_listening_host_is_reachable(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_behind_a_proxy_the_download_decides(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert unreachable(f"http://127.0.0.1:{_closed_port()}") is None


_BUILD = """
import json, sys, time
import torch
from dgc_convert import create_model
from dgc_convert.errors import SettingsError
start = time.perf_counter()
try:
    model = create_model("timm:resnet18", pretrained=True)
except SettingsError as error:
    print(json.dumps({"error": str(error), "seconds": time.perf_counter() - start}))
else:
    print(json.dumps({"stem": model.conv1.weight.flatten()[:5].tolist(), "seconds": time.perf_counter() - start}))
"""


def _build_offline(tmp_path) -> dict:
    """create_model("timm:resnet18", pretrained=True) in a child whose hub endpoint refuses connections."""
    env = {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Retrying" not in done.stderr  # huggingface_hub's backoff never started
    return json.loads(done.stdout)


def test_weights_not_cached_and_hub_unreachable_fail_in_one_line_at_once(tmp_path):
    result = _build_offline(tmp_path)
    assert "error" in result, result
    message = result["error"]
    assert "\n" not in message
    assert message.startswith("resnet18: pretrained weights are not in the Hugging Face cache (")
    assert str(tmp_path / "hub") in message and "refused" in message.lower() and "--checkpoint" in message
    assert result["seconds"] < 10  # was about 50 s of retries


def test_cached_weights_load_without_a_network(tmp_path):
    import timm

    reference = timm.create_model("resnet18")
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    result = _build_offline(tmp_path)
    assert "stem" in result, result
    assert result["stem"] == pytest.approx(reference.conv1.weight.flatten()[:5].tolist())
    assert result["seconds"] < 10
    assert not torch.equal(torch.tensor(result["stem"]), torch.zeros(5))


def test_a_stalled_lookup_or_connection_costs_at_most_the_timeout(monkeypatch):
    import time

    import dgc_convert.conversion.network as network

    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)

    def stalled(address, timeout=None):  # a resolver that never answers, then a dropped SYN per address
        time.sleep(5)
        raise TimeoutError

    monkeypatch.setattr(network.socket, "create_connection", stalled)
    start = time.perf_counter()
    reason = unreachable("https://huggingface.co", timeout=0.5)
    assert time.perf_counter() - start < 2
    assert reason == "no answer from huggingface.co within 0.5 s"


def test_a_malformed_endpoint_is_left_to_the_download(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert unreachable("http://host:notaport") is None
