"""Whether the Hugging Face hub can be reached, asked once with a short timeout, so a machine without network
fails a hub look-up at once with one clear message instead of retrying for a minute."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False at once when an offline variable (OFFLINE_ENV) is set, else whether $HF_ENDPOINT's host accepts a
    connection within `timeout` seconds: the one probe behind every hub look-up (models, revisions, text sets)."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV):
        return False
    try:
        socket.create_connection(_endpoint(), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unreachable_error(name: str) -> FileNotFoundError:
    host, _ = _endpoint()
    return FileNotFoundError(
        f"model {name!r} is not a local path and not in the local hub cache, and the hub ({host}) cannot be "
        "reached (offline?). Check the name, pass a local folder, or download it on a machine with network."
    )
