"""The installed coembed version (``coembed.__version__``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coembed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
