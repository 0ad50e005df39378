"""Opening media containers with PyAV (FFmpeg): any file a video or audio stream lives in."""

from __future__ import annotations

from typing import Any

import av

from coembed.errors import BadItem


def open_media(source: Any) -> Any:
    """``av.open(source)``; :class:`BadItem` for input that is not media. Use as a context manager."""
    try:
        return av.open(source)
    except Exception as exc:  # av raises many error types for non-media input
        raise BadItem(f"not a readable media file ({type(exc).__name__})") from exc


def video_stream(container: Any) -> Any:
    """The container's first video stream that is a video, not a cover image (audio files with album
    art store one as a video stream); ``None`` when it has none."""
    return next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic),
                None)


