"""Video files: one frame decoded as an image, and probing what a file's streams really hold.

Probing reads packets only (no decoding): which streams a file has and how far
their data reaches, so a truncated download is found before any frame is
decoded for it. The ``video_folder`` source probes every video it lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import av
from PIL import Image

from coembed.errors import BadItem
from coembed.media.containers import open_media, video_stream
from coembed.media.items import VideoFrame, check_file

#: A file whose packets end this many seconds before its stated duration is truncated.
TRUNCATION_TOLERANCE_S = 0.5

#: Probing demuxes packets from this many seconds before the stated end (then from the start if that fails).
TAIL_SECONDS = 2.0


def read_video_frame(frame: VideoFrame) -> Image.Image:
    """Decode the frame of ``frame.path`` nearest to ``frame.time`` as a PIL image."""
    check_file(frame.path)
    with open_media(frame.path) as container:
        stream = video_stream(container)
        if stream is None:
            raise BadItem("no video stream")
        target = frame.time
        best = None
        try:
            if target > 0:
                if stream.time_base:
                    container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
                else:  # no stream time base: seek in the container's microseconds
                    container.seek(int(target * av.time_base), backward=True, any_frame=False)
            for decoded in container.decode(stream):
                best = decoded
                if decoded.time is not None and decoded.time >= target:
                    break
        except av.error.FFmpegError as exc:
            if best is None:
                raise BadItem(f"video could not be decoded ({type(exc).__name__})") from exc
        if best is None:
            raise BadItem("video stream holds no frames")
        return best.to_image()


@dataclass(frozen=True)
class VideoProbe:
    """The spans (seconds on the file's timeline) that a file's video and audio packets cover.

    ``None`` for a stream the file lacks (or whose stream holds no packets).
    """

    video: tuple[float, float] | None
    audio: tuple[float, float] | None

    def to_json(self) -> dict[str, Any]:
        return {"video": list(self.video) if self.video else None, "audio": list(self.audio) if self.audio else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VideoProbe":
        def span(key: str) -> tuple[float, float] | None:
            value = data.get(key)
            return (float(value[0]), float(value[1])) if value else None

        return cls(span("video"), span("audio"))


def probe_video(path: str) -> VideoProbe:
    """Find a video file's streams and how far their data really reaches (packets only, no decoding).

    Raises :class:`BadItem` for a file that is not media or whose data ends
    before the duration its header states (a truncated download).
    """
    with open_media(path) as container:
        video = video_stream(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        streams = [s for s in (video, audio) if s is not None]
        if not streams:
            return VideoProbe(None, None)
        stated = _stated_end(container, streams)
        ends = _packet_ends(container, streams, stated)
        if not ends:
            raise BadItem("no media data: the streams hold no packets")
        reached = max(ends.values())
        if stated is not None and reached < stated - TRUNCATION_TOLERANCE_S:
            raise BadItem(f"truncated file: data ends at {reached:.2f} s of the stated {stated:.2f} s")

        def span(stream: Any) -> tuple[float, float] | None:
            if stream is None or stream.index not in ends:
                return None
            return (_start_of(container, stream), ends[stream.index])

        return VideoProbe(span(video), span(audio))


def _start_of(container: Any, stream: Any) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    if container.start_time is not None:
        return container.start_time / av.time_base
    return 0.0


def _stated_end(container: Any, streams: list[Any]) -> float | None:
    """Where the headers say the streams end (seconds), or None when they do not say."""
    ends = [float(((s.start_time or 0) + s.duration) * s.time_base)
            for s in streams if s.duration is not None and s.time_base]
    if ends:
        return max(ends)
    if container.duration is not None:
        return ((container.start_time or 0) + container.duration) / av.time_base
    return None


def _packet_ends(container: Any, streams: list[Any], stated_end: float | None) -> dict[int, float]:
    """stream index -> end (seconds) of its last packet: from a seek near the stated end, or the whole file."""
    if stated_end is not None and stated_end > TAIL_SECONDS:
        try:
            container.seek(int((stated_end - TAIL_SECONDS) * av.time_base), backward=True)
            ends = _demux_ends(container, streams)
            if all(s.index in ends for s in streams):
                return ends
        except (av.error.FFmpegError, OSError):
            pass
        # a stream that ends early, or a file the seek cannot handle: read every packet
        with av.open(container.name) as again:
            return _demux_ends(again, [again.streams[s.index] for s in streams])
    return _demux_ends(container, streams)


def _demux_ends(container: Any, streams: list[Any]) -> dict[int, float]:
    ends: dict[int, float] = {}
    try:
        for packet in container.demux(*streams):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or packet.time_base is None:
                continue  # a flush packet
            end = float((ts + (packet.duration or 0)) * packet.time_base)
            index = packet.stream.index
            if end > ends.get(index, -math.inf):
                ends[index] = end
    except (av.error.FFmpegError, OSError):
        pass  # damaged data: what was read counts, and a short reach means "truncated"
    return ends
