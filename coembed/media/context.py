"""The settings and measurements of a block of decoding: the pixel limit in force, the audio level found.

The extraction wraps each ``adapter.load`` in :func:`decoding`, so recipe
settings reach adapters that just call :func:`~coembed.media.load_image` /
:func:`~coembed.media.load_audio`, and what the decoders measure (an audio
clip's level) comes back with the item without any adapter passing it on.
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

from coembed.config import DEFAULT_MAX_IMAGE_PIXELS


class FromContext(enum.Enum):
    FROM_CONTEXT = "from_context"


#: ``load_image(..., max_pixels=FROM_CONTEXT)``: the limit of the enclosing :func:`decoding` block.
FROM_CONTEXT = FromContext.FROM_CONTEXT


@dataclass
class _DecodeContext:
    max_image_pixels: int | None
    measurements: dict[str, float] = field(default_factory=dict)


_context: ContextVar[_DecodeContext | None] = ContextVar("coembed_decoding", default=None)


@contextmanager
def decoding(max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[dict[str, float]]:
    """Settings and measurements for the items decoded inside the block.

    :func:`load_image` refuses images above ``max_image_pixels`` (``None``: no
    limit) unless called with its own limit, and :func:`load_audio` records
    the level of what it decoded as ``"audio_db"`` in the yielded dict. The
    extraction wraps each ``adapter.load`` in this block, so recipe settings
    reach adapters that just call :func:`load_image` / :func:`load_audio`.
    """
    ctx = _DecodeContext(max_image_pixels)
    token = _context.set(ctx)
    try:
        yield ctx.measurements
    finally:
        _context.reset(token)




def current_max_image_pixels() -> int | None:
    """The pixel limit of the enclosing :func:`decoding` block, else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    ctx = _context.get()
    return ctx.max_image_pixels if ctx is not None else DEFAULT_MAX_IMAGE_PIXELS


def record_measurement(name: str, value: float) -> None:
    """Note a measurement of the item being decoded (nothing happens outside a :func:`decoding` block)."""
    ctx = _context.get()
    if ctx is not None:
        ctx.measurements[name] = value
