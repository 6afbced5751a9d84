"""Whether the Hugging Face hub can be reached, asked once with a short timeout, so a machine without network
fails a hub look-up at once with one clear message instead of retrying for a minute."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def network_available() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not accept a connection within PROBE_TIMEOUT_S
    (asked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return _reachable(*_endpoint())


def hub_unreachable_error(name: str) -> FileNotFoundError:
    host, _ = _endpoint()
    return FileNotFoundError(
        f"model {name!r} is not a local path and not in the local hub cache, and the hub ({host}) cannot be "
        "reached (offline?). Check the name, pass a local folder, or download it on a machine with network."
    )
