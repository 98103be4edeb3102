"""Whether pretrained weights can be downloaded, decided in seconds, not minutes.

Without a network, huggingface_hub retries each file five times with backoff
(about 50 s) before failing, or before falling back to weights it has cached.
``create_model`` asks ``unreachable`` first (one TCP connection, a few
seconds at most) and, when the hub cannot be reached, loads from the cache
alone under ``hub_offline``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

__all__ = ["CONNECT_TIMEOUT_S", "hub_endpoint", "hub_offline", "unreachable"]

CONNECT_TIMEOUT_S = 3.0  # seconds one reachability check may take
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def hub_endpoint() -> str:
    """The Hugging Face endpoint timm downloads from (``HF_ENDPOINT`` where set)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached (a one-line reason), or None when it can or we cannot tell.

    The whole check (name lookup and connection, to every address the name
    has) takes at most ``timeout`` seconds: it runs in a daemon thread that is
    left behind when it overruns, because neither a stalled resolver nor a
    firewall that drops packets answers sooner. Behind a proxy
    (``HTTPS_PROXY``/``ALL_PROXY``) the host is not dialled directly, so the
    answer is None and the download itself decides.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a malformed HF_ENDPOINT: let the download report it
        return None
    if not host:
        return None
    outcome: list[str | None] = []

    def dial() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except TimeoutError:
            outcome.append(f"no answer from {host} within {timeout:g} s")
        except OSError as error:  # name resolution, refused, no route
            outcome.append(f"{host}: {error.strerror or error}")

    worker = threading.Thread(target=dial, name="dgc-convert-reachability", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer from {host} within {timeout:g} s"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the duration: files come from its cache or fail at once.

    ``HF_HUB_OFFLINE`` is read when huggingface_hub is imported, so the
    environment variable cannot switch it later; its constant is what every
    download consults.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
