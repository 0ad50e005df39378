"""Helpers the built-in adapters share to find pretrained weights without hanging.

Libraries such as ``huggingface_hub`` retry a failed request for tens of
seconds, and ``urllib`` has no timeout at all. The adapters therefore look in
the local caches first and, only when the weights are not there, check once
and quickly that the download host can be reached before handing over to the
library. Without network the caller raises
:class:`~coembed.registry.WeightsUnavailable` at once.

Local weights are identified by their content (:func:`path_identity`), never
by where they lie, so a model trained with a file on one machine loads with a
copy of it anywhere.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import constants, try_to_load_from_cache

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
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return constants.HF_HUB_OFFLINE or env in _TRUE


def hub_endpoint() -> str:
    """The Hugging Face Hub endpoint in use (``HF_ENDPOINT`` or huggingface.co)."""
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
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def hub_cache_dir(cache_dir: str | None) -> str:
    """The Hub cache folder that ``cache_dir`` (or the default) means."""
    return cache_dir or constants.HF_HUB_CACHE


#: Names skipped when hashing a model folder: they never change what the model computes.
IGNORED_DIRS = frozenset({"__pycache__"})
IGNORED_SUFFIXES = (".lock", ".pyc", ".md")
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, hashed once per process for each ``(path, size, mtime)``.

    A file rewritten in place gets a new size or modification time and so is hashed again.
    """
    p = Path(path).resolve()
    stat = p.stat()
    return _file_digest(str(p), stat.st_size, stat.st_mtime_ns)


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(folder: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The files that define the model in ``folder``: ``(relative POSIX path, path)``, sorted.

    Every file under the folder counts (symbolic links followed, as in a Hugging
    Face cache snapshot) except what never changes the model's output: hidden
    files and folders (``.git``, ``.cache``, ``.gitattributes``, ...),
    ``__pycache__``, ``*.pyc``, lock files (``*.lock``) and documentation (``*.md``,
    such as the model card).
    """
    root = Path(folder).resolve()
    found: list[tuple[str, Path]] = []
    for current, dirs, files in os.walk(root, followlinks=True):
        real = Path(current).resolve()
        # a link back to a folder above would be walked forever
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in IGNORED_DIRS
                   and not real.is_relative_to(Path(current, d).resolve())]
        for name in files:
            if not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES):
                path = Path(current, name)
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def folder_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 (hex) over the sorted relative paths and contents of :func:`model_files` of ``folder``."""
    digest = hashlib.sha256()
    for name, path in model_files(folder):
        digest.update(f"{name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def path_identity(path: str | os.PathLike[str]) -> str:
    """The weights in a local file or model folder, by content, for fingerprints.

    ``"sha256:<hex>"`` of a file's bytes (:func:`file_digest`), ``"folder-sha256:<hex>"``
    of a folder's model files (:func:`folder_digest`): the same weights anywhere, under
    any name, have the same identity. ``"missing <absolute path>"`` when there is nothing.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file():
        return f"sha256:{file_digest(p)}"
    if p.is_dir():
        return f"folder-sha256:{folder_digest(p)}"
    return f"missing {p}"
