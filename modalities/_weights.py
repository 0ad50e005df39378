"""Helpers the built-in adapters share to find pretrained weights without hanging.

Libraries such as ``huggingface_hub`` retry a failed request for tens of
seconds, and ``urllib`` has no timeout at all. The adapters therefore look in
the local caches first and, only when the weights are not there, check once
and quickly that the download host can be reached before handing over to the
library. Without network the caller raises
:class:`~coembed.registry.WeightsUnavailable` at once.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Seconds to wait for a TCP connection to a download host before calling it unreachable.
PROBE_TIMEOUT_S = 5.0

_TRUE = {"1", "on", "yes", "true"}


def none_if_none_string(value: Any) -> Any:
    """Map the strings ``"none"``/``"null"``/``""`` (any case) to ``None``, for options set from a CLI or YAML."""
    if isinstance(value, str) and value.strip().lower() in {"none", "null", ""}:
        return None
    return value


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` on one line, without a final period, to embed in a sentence."""
    message = " ".join(str(exc).split()).rstrip(".")
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def hub_offline() -> bool:
    """True when Hugging Face Hub offline mode is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return constants.HF_HUB_OFFLINE or env in _TRUE


def hub_endpoint() -> str:
    """The Hugging Face Hub endpoint in use (``HF_ENDPOINT`` or huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host (or the proxy for it) cannot be reached, or ``None`` if a TCP connection opens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc})"


def download_blocker(url: str) -> str | None:
    """Why a download from ``url`` must not be attempted now, or ``None`` if it may be.

    Hub offline mode blocks downloads from the Hub endpoint; any host that does
    not answer quickly blocks downloads from it.
    """
    if hub_offline() and url.startswith(hub_endpoint()):
        return "Hugging Face Hub offline mode is on (HF_HUB_OFFLINE) and the files are not in the local cache"
    return unreachable(url)


def cached_hub_file(repo_id: str, filenames: list[str], cache_dir: str | None) -> str | None:
    """Path of the first of ``filenames`` already in the local Hub cache for ``repo_id``, else ``None``."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def hub_cache_dir(cache_dir: str | None) -> str:
    """The Hub cache folder that ``cache_dir`` (or the default) means."""
    from huggingface_hub import constants

    return cache_dir or constants.HF_HUB_CACHE


def path_identity(path: str | os.PathLike[str]) -> str:
    """``"<absolute path> (<size> bytes)"`` for a weights file or model folder, for fingerprints.

    The size of a folder is the total size of the files under it.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file():
        size = p.stat().st_size
    elif p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    else:
        return f"{p} (missing)"
    return f"{p} ({size} bytes)"
