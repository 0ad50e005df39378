"""Real media files for the data tests: videos written with PyAV, WAV with soundfile, broken files.

Videos are tiny (64x64, 10 fps, mpeg4 + AAC) so that writing, probing and
decoding them takes milliseconds. Frame ``i`` is filled with grey level
``frame_level(i)`` and second ``k`` of the audio is a tone of
``tone_hz(k)``, so a test can check which frame and which audio a pair got.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

FPS = 10
SIZE = 64


def frame_level(index: int) -> int:
    """Grey level of frame ``index`` of a written video."""
    return (index * 8) % 256


def tone_hz(second: int) -> float:
    """Frequency of the tone in second ``second`` of a written video's audio."""
    return 300.0 + 200.0 * second


def write_video(path: Path, seconds: float = 3.0, *, video: bool = True, audio: bool = True, rate: int = 16000,
                channels: int = 1, silent: bool = False, vcodec: str = "mpeg4", acodec: str = "aac",
                options: dict[str, str] | None = None) -> Path:
    """Write a real video file (container chosen by the suffix)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as out:
        if video:
            vs = out.add_stream(vcodec, rate=FPS)
            vs.width = vs.height = SIZE
            vs.pix_fmt = "yuv420p"
        if audio:
            layout = "mono" if channels == 1 else "stereo"
            ast = out.add_stream(acodec, rate=rate, layout=layout)
        if video:
            for i in range(round(seconds * FPS)):
                frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), frame_level(i), np.uint8), format="rgb24")
                frame.pts = i
                for packet in vs.encode(frame):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
        if audio:
            n = round(seconds * rate)
            t = np.arange(n) / rate
            freq = np.array([tone_hz(int(x)) for x in t]) if n else np.zeros(0)
            wave = np.zeros(n) if silent else 0.4 * np.sin(2 * np.pi * freq * t)
            fmt = ast.codec_context.format.name
            for start in range(0, n, 1024):
                block = wave[start:start + 1024].astype(np.float32)
                if fmt.endswith("p"):
                    array = np.tile(block, (channels, 1))
                else:
                    array = np.repeat(block, channels)[None, :]
                    if fmt == "s16":
                        array = (array * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(array, format=fmt, layout=layout)
                frame.sample_rate = rate
                frame.pts = start
                for packet in ast.encode(frame):
                    out.mux(packet)
            for packet in ast.encode():
                out.mux(packet)
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0,
              amplitude: float = 0.4, subtype: str = "PCM_16") -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.repeat(wave[:, None], channels, axis=1).astype(np.float32), rate, subtype=subtype)
    return path


def write_png(path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 30, 30),
              mode: str = "RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def non_utf8_name(folder: Path, stem: bytes, suffix: str) -> Path:
    """A path in ``folder`` whose file name holds bytes that are not UTF-8 (as os.fsdecode gives it)."""
    return folder / os.fsdecode(stem + b"\xff\xfe" + suffix.encode())


def write_vggsound_csv(path: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    """The VGG-Sound CSV: no header; YouTube id, start second, label, split."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def clip_name(ytid: str, start: int, suffix: str = ".mp4") -> str:
    """VGG-Sound clip file name of a CSV row."""
    return f"{ytid}_{start:06d}{suffix}"
