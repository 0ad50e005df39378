"""Audio of any format, rate and channel layout, decoded to mono float32 at the rate an encoder needs.

soundfile reads what it can (WAV, FLAC, OGG, ...); FFmpeg (PyAV) reads the
rest, video files and spans of them (:class:`~coembed.media.AudioSegment`)
included. Inside a :func:`~coembed.media.decoding` block the level of every
decoded clip is recorded (``"audio_db"``), so silence is judged by the
threshold of the run, without decoding again. :func:`fit_audio` brings a clip
shorter than an encoder's window up to it (padded with silence or repeated) or
refuses it, and records what it did, so the extraction flags the item.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Any

import av
import numpy as np
import soundfile as sf

from coembed.config import ShortAudio
from coembed.errors import BadItem
from coembed.media.context import record_measurement
from coembed.media.containers import open_media
from coembed.media.items import AudioSegment, MediaRef, Waveform, as_array, check_file

#: The measurement :func:`load_audio` records: the clip's RMS level in dBFS.
AUDIO_DB = "audio_db"

#: The floor :func:`audio_level_db` reports for digital silence.
SILENCE_FLOOR_DB = -200.0

#: The measurements :func:`fit_audio` records for a clip it padded or repeated: the clip's own length
#: (seconds), under the name of what was done, and the length of the window it now fills.
AUDIO_PADDED = "audio_padded_from_s"
AUDIO_REPEATED = "audio_repeated_from_s"
AUDIO_WINDOW = "audio_window_s"

#: A clip shorter than this holds no usable sound: a bad item whatever ``short_audio`` says.
MIN_USABLE_SECONDS = 0.01


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
    from scipy.signal import resample_poly  # scipy.signal takes a second to import; most audio needs no resampling

    ratio = Fraction(target_rate, orig_rate).limit_denominator(10_000)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def _decode_audio_av(source: Any, start: float = 0.0, duration: float | None = None) -> Waveform:
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
        array = as_array(item)
        if array is None:
            raise BadItem(f"unsupported audio input of type {type(item).__name__}")
        if item_sample_rate is None:
            raise BadItem("an audio array needs its sample rate")
        wave = Waveform(to_mono(array), int(item_sample_rate))
    if wave.samples.size == 0:
        raise BadItem("audio holds no samples")
    if not np.all(np.isfinite(wave.samples)):
        raise BadItem("audio holds NaN or infinite samples")
    record_measurement(AUDIO_DB, audio_level_db(wave.samples))
    return Waveform(resample(wave.samples, wave.sample_rate, sample_rate), sample_rate)


def _decode_audio_file(data: str | bytes) -> Waveform:
    """A whole audio file (a path, or its bytes): soundfile first, FFmpeg for what soundfile cannot read."""
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


def fit_audio(wave: Waveform, window_samples: int, short_audio: ShortAudio, encoder: str) -> Waveform:
    """``wave`` unchanged when it holds at least ``window_samples``; a shorter clip padded with silence
    at its end (``"pad"``), repeated to fill the window (``"repeat"``), or refused (``"refuse"``).

    A clip under :data:`MIN_USABLE_SECONDS` is always refused. A padded or repeated clip is recorded
    (:data:`AUDIO_PADDED` or :data:`AUDIO_REPEATED`, and :data:`AUDIO_WINDOW`) inside a
    :func:`~coembed.media.decoding` block, so the extraction flags it. ``encoder`` names the
    encoder in the reasons.
    """
    n, rate = len(wave.samples), wave.sample_rate
    if n >= window_samples:
        return wave
    seconds, window = n / rate, window_samples / rate
    if n < round(MIN_USABLE_SECONDS * rate):
        raise BadItem(f"audio too short to use: {n} samples at {rate} Hz ({seconds * 1000:.1f} ms); "
                      f"a clip needs at least {MIN_USABLE_SECONDS * 1000:g} ms")
    if short_audio == "refuse":
        raise BadItem(f"audio too short for {encoder}: {n} samples at {rate} Hz ({seconds:.3f} s); one "
                      f"example needs {window_samples} ({window:.3f} s); short_audio=pad or repeat embeds it")
    if short_audio == "pad":
        samples = np.pad(wave.samples, (0, window_samples - n))
        record_measurement(AUDIO_PADDED, seconds)
    else:
        samples = np.tile(wave.samples, -(-window_samples // n))[:window_samples]
        record_measurement(AUDIO_REPEATED, seconds)
    record_measurement(AUDIO_WINDOW, window)
    return Waveform(samples.astype(np.float32, copy=False), rate)
