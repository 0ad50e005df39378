"""Decoding raw media into arrays: audio of any rate/channels, images of any mode.

Everything that reads an image or a sound goes through here, so adapters and
data sources agree on what a bad item is. Failures raise
:class:`~coembed.registry.BadItem` with a short reason.
"""

from __future__ import annotations

import enum
import errno
import io
import math
import os
import stat
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from coembed.registry import BadItem

#: Images above this many pixels are refused (decompression bombs); recipes can change it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default warning threshold

#: Audio quieter than this (RMS, dBFS) counts as silent.
DEFAULT_SILENCE_DB = -60.0

#: The floor :func:`audio_level_db` reports for digital silence.
SILENCE_FLOOR_DB = -200.0


class OverLimit(BadItem):
    """An item refused by a configurable limit (not a fault of the file): never cached as bad."""


class MediaRef(ABC):
    """A raw item that lives elsewhere (a cell of a memory-mapped table, ...).

    Records hold the reference; the decoder (in a DataLoader worker) calls
    :meth:`fetch` for the raw item itself, so a data set never has to sit in
    memory and pickling a record stays cheap.
    """

    @abstractmethod
    def fetch(self) -> Any:
        """The raw item: a path, bytes, a ``{"bytes", "path"}`` dict, a PIL image, ..."""

    @abstractmethod
    def identity(self) -> str:
        """A string that changes when the referenced content changes (the store's cache key)."""


class _Default(enum.Enum):
    FROM_CONTEXT = "from_context"


#: ``load_image(..., max_pixels=FROM_CONTEXT)``: the limit of the enclosing :func:`decoding` block.
FROM_CONTEXT = _Default.FROM_CONTEXT


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


def safe_text(text: str) -> str:
    """``text`` made encodable as UTF-8: lone surrogates (the undecodable bytes of a
    file name, as ``os.fsdecode`` keeps them) become backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_path_name(path: str | os.PathLike) -> None:
    """Raise :class:`BadItem` for a path whose name is not valid UTF-8."""
    name = os.fsdecode(path)
    if safe_text(name) != name:
        raise BadItem(f"path name is not valid UTF-8: {safe_text(name)!r}")


@dataclass(frozen=True)
class AudioSegment:
    """A span of audio inside a media file: ``start`` and ``duration`` in seconds."""

    path: str
    start: float
    duration: float


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a video file, at ``time`` seconds."""

    path: str
    time: float


@dataclass
class Waveform:
    """Mono float32 samples in [-1, 1] and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / float(self.sample_rate)


#: ``os.stat`` errors that mean "no such file" (those :meth:`Path.exists` answers ``False`` to).
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def stat_file(path: str | os.PathLike) -> os.stat_result:
    """``os.stat(path)`` in one call; :class:`BadItem` when its name is not UTF-8, or it is missing,
    not a regular file, empty or unreadable."""
    check_path_name(path)
    try:
        st = os.stat(path)
    except ValueError:  # an embedded null byte
        st = None
    except OSError as exc:
        if exc.errno not in _MISSING_ERRNOS:
            raise
        st = None
    if st is None:
        raise BadItem(f"missing file: {os.fsdecode(path)!r}")
    if not stat.S_ISREG(st.st_mode):
        raise BadItem(f"not a file: {os.fsdecode(path)!r}")
    if st.st_size == 0:
        raise BadItem("zero-byte file")
    if not os.access(path, os.R_OK):
        raise BadItem(f"unreadable file (permission denied): {os.fsdecode(path)!r}")
    return st


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path`, after the checks of :func:`stat_file`."""
    stat_file(path)
    return Path(path)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[n]`` or ``[n, channels]`` -> ``[n]`` float32 (mean over channels)."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise BadItem(f"audio array must be 1-D or [samples, channels], got shape {samples.shape}")
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        samples = samples.astype(np.float32) / float(max(abs(info.min), info.max))
    return samples.astype(np.float32, copy=False)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy) from ``orig_rate`` to ``target_rate``."""
    if orig_rate == target_rate:
        return samples
    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, orig_rate).limit_denominator(10_000)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def open_media(source: Any) -> Any:
    """``av.open(source)``; :class:`BadItem` for input that is not media. Use as a context manager."""
    import av

    try:
        return av.open(source)
    except Exception as exc:  # av raises many error types for non-media input
        raise BadItem(f"not a readable media file ({type(exc).__name__})") from exc


def video_stream(container: Any) -> Any:
    """The container's first video stream that is a video, not a cover image (audio files with album
    art store one as a video stream); ``None`` when it has none."""
    import av

    return next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic),
                None)


def _decode_audio_av(source: Any, start: float = 0.0, duration: float | None = None) -> Waveform:
    import av

    with open_media(source) as container:
        if not container.streams.audio:
            raise BadItem("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, any_frame=False, backward=True)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        try:
            for frame in container.decode(stream):
                if first_time is None:
                    first_time = float(frame.time) if frame.time is not None else 0.0
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                if duration is not None and frame.time is not None and frame.time > start + duration:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            if not chunks:
                raise BadItem(f"audio could not be decoded ({type(exc).__name__})") from exc
            # truncated at the end: keep what decoded
    if not chunks:
        raise BadItem("audio stream holds no samples")
    samples = np.concatenate(chunks).astype(np.float32)
    offset = max(0.0, start - (first_time or 0.0))
    begin = int(round(offset * rate))
    end = None if duration is None else begin + int(round(duration * rate))
    return Waveform(samples[begin:end], int(rate))


def load_audio(
    item: Any,
    sample_rate: int,
    *,
    item_sample_rate: int | None = None,
) -> Waveform:
    """Decode ``item`` to mono float32 at ``sample_rate``.

    ``item`` may be a path (any format soundfile or FFmpeg reads, video files
    included), bytes, an :class:`AudioSegment`, a :class:`Waveform`, a dict
    ``{"array": ..., "sampling_rate": ...}`` (the ``datasets`` Audio feature
    decoded) or ``{"bytes": ..., "path": ...}`` (undecoded), a
    :class:`MediaRef`, or a numpy/torch array with ``item_sample_rate``.
    Inside a :func:`decoding` block the level of the decoded audio is recorded.
    """
    if isinstance(item, MediaRef):
        item = item.fetch()
    wave: Waveform
    if isinstance(item, Waveform):
        wave = Waveform(to_mono(item.samples), item.sample_rate)
    elif isinstance(item, dict) and "array" in item:
        wave = Waveform(to_mono(np.asarray(item["array"])), int(item["sampling_rate"]))
    elif isinstance(item, dict) and ("bytes" in item or "path" in item):
        data = item.get("bytes")
        return load_audio(data if data else item.get("path"), sample_rate, item_sample_rate=item_sample_rate)
    elif isinstance(item, AudioSegment):
        check_file(item.path)
        wave = _decode_audio_av(item.path, item.start, item.duration)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise BadItem("empty audio bytes")
        wave = _decode_audio_file(bytes(item))
    elif isinstance(item, (str, os.PathLike)):
        wave = _decode_audio_file(str(check_file(item)))
    else:
        array = _as_numpy(item)
        if array is None:
            raise BadItem(f"unsupported audio input of type {type(item).__name__}")
        if item_sample_rate is None:
            raise BadItem("an audio array needs its sample rate")
        wave = Waveform(to_mono(array), int(item_sample_rate))
    if wave.samples.size == 0:
        raise BadItem("audio holds no samples")
    if not np.all(np.isfinite(wave.samples)):
        raise BadItem("audio holds NaN or infinite samples")
    ctx = _context.get()
    if ctx is not None:
        ctx.measurements["audio_db"] = audio_level_db(wave.samples)
    return Waveform(resample(wave.samples, wave.sample_rate, sample_rate), sample_rate)


def _as_numpy(item: Any) -> np.ndarray | None:
    if isinstance(item, np.ndarray):
        return item
    try:
        import torch

        if isinstance(item, torch.Tensor):
            return item.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return None


def _decode_audio_file(data: str | bytes) -> Waveform:
    """A whole audio file (a path, or its bytes): soundfile first, FFmpeg for what soundfile cannot read."""
    import soundfile as sf

    def source() -> Any:
        return io.BytesIO(data) if isinstance(data, bytes) else data

    try:
        samples, rate = sf.read(source(), dtype="float32", always_2d=True)
        return Waveform(to_mono(samples), int(rate))
    except Exception:
        return _decode_audio_av(source())


def audio_level_db(samples: np.ndarray) -> float:
    """RMS level of ``samples`` in dBFS (:data:`SILENCE_FLOOR_DB` for digital silence)."""
    if samples.size == 0:
        return SILENCE_FLOOR_DB
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return max(SILENCE_FLOOR_DB, 20.0 * math.log10(rms)) if rms > 0.0 else SILENCE_FLOOR_DB


def is_silent(samples: np.ndarray, threshold_db: float = DEFAULT_SILENCE_DB) -> bool:
    """True when the RMS level of ``samples`` is below ``threshold_db`` dBFS."""
    return audio_level_db(samples) < threshold_db


def load_image(item: Any, max_pixels: int | None | Literal[_Default.FROM_CONTEXT] = FROM_CONTEXT):
    """Decode ``item`` to an RGB :class:`PIL.Image.Image`.

    ``item`` may be a path, bytes, a :class:`VideoFrame`, a PIL image, a numpy
    ``[H, W]``/``[H, W, C]`` uint8 array, a dict ``{"bytes": ..., "path": ...}``
    (the ``datasets`` Image feature undecoded) or a :class:`MediaRef`. Any mode
    (grayscale, RGBA, CMYK, palette, 16-bit) is converted to RGB. Images above
    ``max_pixels`` (default: the enclosing :func:`decoding` block's limit, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`; ``None``: no limit) raise :class:`OverLimit`.
    """
    from PIL import Image

    if max_pixels is FROM_CONTEXT:
        ctx = _context.get()
        max_pixels = ctx.max_image_pixels if ctx is not None else DEFAULT_MAX_IMAGE_PIXELS
    if isinstance(item, MediaRef):
        item = item.fetch()
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, VideoFrame):
        image = read_video_frame(item)
    elif isinstance(item, dict) and ("bytes" in item or "path" in item):
        data = item.get("bytes")
        return load_image(data if data else item["path"], max_pixels)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise BadItem("empty image bytes")
        image = _open_image(io.BytesIO(bytes(item)), max_pixels)
    elif isinstance(item, (str, os.PathLike)):
        image = _open_image(check_file(item), max_pixels)
    else:
        array = _as_numpy(item)
        if array is None:
            raise BadItem(f"unsupported image input of type {type(item).__name__}")
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise OverLimit(f"image too large: {image.width * image.height} pixels, above the limit of {max_pixels}")
    return to_rgb(image)


def _open_image(source: Any, max_pixels: int | None):
    from PIL import Image

    try:
        image = Image.open(source)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise OverLimit(f"image too large: {image.width * image.height} pixels, "
                            f"above the limit of {max_pixels}")
        image.load()
    except BadItem:
        raise
    except Image.DecompressionBombError as exc:
        raise OverLimit("image too large: above PIL's decompression-bomb pixel limit") from exc
    except Exception as exc:
        raise BadItem(f"not a readable image ({type(exc).__name__})") from exc
    return image


def to_rgb(image):
    """Any PIL mode -> RGB. 16-bit greyscale is scaled, alpha is composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        scale = 65535.0 if peak > 255 else 255.0
        array = np.clip(array / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        array = (array - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def read_video_frame(frame: VideoFrame):
    """Decode the frame of ``frame.path`` nearest to ``frame.time`` as a PIL image."""
    import av

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
