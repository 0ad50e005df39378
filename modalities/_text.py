"""Validation of raw text items, shared by the text adapters."""

from __future__ import annotations

from typing import Any

from coembed.registry import BadItem


def require_text(item: Any) -> str:
    """Return ``item`` if it is a string with some non-whitespace content, else raise :class:`BadItem`."""
    if not isinstance(item, str):
        raise BadItem(f"text item must be a string, got {type(item).__name__}")
    if not item.strip():
        raise BadItem("empty text")
    return item
