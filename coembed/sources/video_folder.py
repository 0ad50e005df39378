"""Videos -> image/audio pairs: the paper's data, read from a folder of clips.

The ``video_folder`` source reads a folder of videos in the VGG-Sound layout: a
CSV without a header (YouTube id, start second, label, split) and clips named
from id and start (``<id>_<start:06d>.mp4``, or ``<id>_<start>.mp4``). Without
a CSV it takes every video under the folder, unlabelled.

Every video is probed once with PyAV (:func:`coembed.media.probe_video`), in
parallel threads: it needs a video stream (for an image modality) and an audio
stream (for an audio modality), data up to the duration its header states, and
at least ``min_seconds`` where both streams overlap. A video that fails becomes a :class:`~coembed.sources.BadRecord`
with the reason. From each good video, ``frames`` frames (the middle one, or N
evenly spaced) become one record each: the frame (:class:`~coembed.media.VideoFrame`)
paired with ``clip_seconds`` of audio centred on it and shifted to stay inside
the video (:class:`~coembed.media.AudioSegment`). Records of one video share
the video as their group, so the split never puts a video on both sides.

Probe results are cached next to the embedding store (``<cache>/.probes/``),
keyed by each file's path, size and modification time, so re-running a killed
or finished run does not probe a folder of hundreds of thousands of videos again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field, PositiveInt, field_validator
from tqdm.auto import tqdm

from coembed.errors import BadItem, RecipeError
from coembed.media import AudioSegment, VideoFrame, VideoProbe, probe_video, safe_text, stat_file
from coembed.sources.base import BadRecord, Record, Source, SourceOptions

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")


#: Bump when probing changes what it finds, to ignore older cache lines.
PROBE_VERSION = 1


class VideoFolderOptions(SourceOptions):
    path: str = Field(description="folder of video clips (searched recursively; hidden files are skipped)")
    csv: str | None = Field(default=None, description="VGG-Sound CSV without a header: YouTube id, start second, "
                                                      "label, split (none: every video in the folder, unlabelled)")
    csv_splits: list[str] | None = Field(default=None, description="keep only CSV rows of these splits, e.g. [train]")
    name_format: str = Field(default="{id}_{start:06d}",
                             description="file name (without extension) of a CSV row's clip; "
                                         "<id>_<start> is tried too")
    frames: Literal["middle"] | PositiveInt = Field(default="middle",
                                                    description="'middle', or N evenly spaced frames per video")
    clip_seconds: float = Field(default=5.0, gt=0.0, description="seconds of audio around each frame")
    min_seconds: float = Field(default=1.0, ge=0.0, description="shorter videos are bad items")
    extensions: list[str] = Field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    probe_workers: int = Field(default=8, ge=1, description="threads probing videos")
    probe_cache: bool = Field(default=True, description="remember probe results across runs")
    missing_clips: Literal["bad", "skip"] = Field(
        default="bad", description="a CSV row whose clip is not in the folder: a bad item (default), or "
                                   "skipped and counted as not downloaded (VGG-Sound clips that left YouTube)")

    @field_validator("name_format")
    @classmethod
    def _formattable(cls, v: str) -> str:
        try:
            v.format(id="x", start=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must use only {{id}} and {{start}} ({exc})") from None
        return v

    def split_name(self) -> str | None:
        return ", ".join(self.csv_splits) if self.csv_splits else None

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else f".{e.lower()}" for e in v]


# ---------------------------------------------------------------------------------------
# probing
# ---------------------------------------------------------------------------------------


class _ProbeCache:
    """Probe results by (relative path, size, mtime), in an append-only JSON-lines file.

    A killed run leaves at most one partial line, which is skipped; a changed
    file has a new size or mtime and is probed again.
    """

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._fh: Any = None
        if file is not None and file.is_file():
            with file.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        if row.pop("v") == PROBE_VERSION:
                            self.entries[(row.pop("path"), row.pop("size"), row.pop("mtime_ns"))] = row
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue

    def get(self, key: tuple[str, int, int]) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: tuple[str, int, int], value: dict[str, Any]) -> None:
        self.entries[key] = value
        if self.file is None:
            return
        if self._fh is None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.file.open("a", encoding="utf-8")
        path, size, mtime_ns = key
        self._fh.write(json.dumps({"v": PROBE_VERSION, "path": path, "size": size, "mtime_ns": mtime_ns, **value})
                       + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class _Video:
    id: str
    path: str | None            # None: the CSV names a clip that is not in the folder
    label: str | None = None


#: A probe's outcome: what the file holds, or why it is bad (and whether that reason may be cached).
_Outcome = tuple[VideoProbe | str, tuple[str, int, int] | None]


def _probe_job(video: _Video, folder: Path, cache: _ProbeCache) -> _Outcome:
    """Check and probe one video; the second value is the cache key when the result is new."""
    assert video.path is not None
    try:
        st = stat_file(video.path)
    except BadItem as exc:  # missing, empty, unreadable, a bad name: cheap to find again, never cached
        return safe_text(str(exc)), None
    except OSError as exc:
        return safe_text(f"unreadable file ({type(exc).__name__}: {exc})"), None
    key = (os.path.relpath(video.path, folder), st.st_size, st.st_mtime_ns)
    cached = cache.get(key)
    if cached is not None:
        return (cached["error"] if "error" in cached else VideoProbe.from_json(cached)), None
    try:
        return probe_video(video.path), key
    except BadItem as exc:
        return safe_text(str(exc)), key
    except Exception as exc:  # an unexpected PyAV error is still one bad video
        return safe_text(f"probe failed: {type(exc).__name__}: {exc}"), None


# ---------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------


def frame_times(start: float, end: float, frames: int | Literal["middle"]) -> list[float]:
    """Times of the frames taken from ``[start, end]``: its middle, or N evenly spaced (centres of N equal parts)."""
    n = 1 if frames == "middle" else int(frames)
    return [round(start + (k + 0.5) * (end - start) / n, 3) for k in range(n)]


def audio_window(t: float, start: float, end: float, seconds: float) -> tuple[float, float]:
    """``(begin, duration)`` of ``seconds`` of audio centred on ``t``, shifted to stay inside ``[start, end]``."""
    duration = min(seconds, end - start)
    begin = min(max(t - duration / 2.0, start), end - duration)
    return round(begin, 3), round(duration, 3)


# ---------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------


def read_vggsound_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, cells)`` of a header-less CSV; blank lines and ``#`` comments are skipped."""
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if row and row[0].strip() and not row[0].lstrip().startswith("#"):
                yield lineno, [cell.strip() for cell in row]


class VideoFolderSource(Source):
    """Frames of videos paired with the audio around them (the paper's VGG-Sound data).

    A recipe modality whose column is ``image`` gets the frames, one whose
    column is ``audio`` the audio segments, one whose column is ``label`` the
    CSV label as text; other modalities get no item from this source.
    """

    name = "video_folder"
    Options = VideoFolderOptions
    options: VideoFolderOptions

    def __iter__(self) -> Iterator[Record | BadRecord]:
        o = self.options
        folder = self.context.resolve_path(o.path)
        if not folder.is_dir():
            raise RecipeError(f"data.path: video folder not found: {folder}")
        files = _list_videos(folder, o.extensions)
        videos: list[_Video] = []
        if o.csv:
            csv_path = self.context.resolve_path(o.csv)
            if not csv_path.is_file():
                raise RecipeError(f"data.csv: CSV not found: {csv_path}")
            for item in self._videos_from_csv(csv_path, files):
                if isinstance(item, BadRecord):
                    yield item
                else:
                    videos.append(item)
        else:
            videos = [_Video(safe_text(rel), path) for rel, path in files.items()]
        self.counts["videos"] = len(videos)
        outcomes = self._probe_all(folder, [v for v in videos if v.path is not None])
        usable = 0
        not_downloaded = 0
        for video in videos:
            if video.path is None:
                if o.missing_clips == "skip":
                    not_downloaded += 1
                else:
                    yield BadRecord(video.id, f"missing file: no clip named {video.id}.* in {folder}")
                continue
            outcome = outcomes[video.path]
            if isinstance(outcome, str):
                yield BadRecord(video.id, outcome)
                continue
            good = False
            for rec in self._pairs(video, outcome):
                good = good or isinstance(rec, Record)
                yield rec
            usable += good
        self.counts["usable_videos"] = usable
        if o.missing_clips == "skip":
            self.counts["csv_rows_not_downloaded"] = not_downloaded
            if not_downloaded:
                log.info("%d CSV rows have no clip in %s: skipped (data.missing_clips: skip)", not_downloaded, folder)

    def _videos_from_csv(self, csv_path: Path, files: dict[str, str]) -> Iterator[_Video | BadRecord]:
        o = self.options
        by_stem: dict[str, str] = {}
        for rel, path in files.items():
            by_stem.setdefault(os.path.splitext(os.path.basename(rel))[0], path)
        seen: set[str] = set()
        for lineno, row in read_vggsound_csv(csv_path):
            where = f"{csv_path.name}:{lineno}"
            try:
                value = float(row[1]) if len(row) > 1 else math.nan
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                if lineno > 1:  # a first line without a number is a header
                    yield BadRecord(where, "CSV row needs a YouTube id and a start second")
                continue
            if o.csv_splits is not None and (len(row) < 4 or row[3] not in o.csv_splits):
                continue
            ytid, label = row[0], (row[2] if len(row) > 2 and row[2] else None)
            start: int | float = int(value) if value.is_integer() else value
            try:
                names = [o.name_format.format(id=ytid, start=start), f"{ytid}_{start}"]
            except ValueError as exc:
                yield BadRecord(where, f"CSV row does not fit data.name_format ({exc})")
                continue
            vid = safe_text(names[0])
            if vid in seen:
                yield BadRecord(vid, f"duplicate CSV row ({where})")
                continue
            seen.add(vid)
            yield _Video(vid, next((by_stem[n] for n in names if n in by_stem), None), label)

    def _probe_all(self, folder: Path, videos: list[_Video]) -> dict[str, VideoProbe | str]:
        """path -> probe or reason, probing in parallel (cached results first) with a progress bar."""
        o = self.options
        cache = _ProbeCache(self._cache_file(folder) if o.probe_cache else None)
        out: dict[str, VideoProbe | str] = {}
        probed = 0
        pool = ThreadPoolExecutor(max_workers=o.probe_workers, thread_name_prefix="coembed-probe")
        try:
            results = pool.map(lambda v: _probe_job(v, folder, cache), videos)
            with tqdm(total=len(videos), desc="probe videos", unit="video", disable=not self.context.progress,
                      dynamic_ncols=True) as bar:
                for video, (outcome, new_key) in zip(videos, results):
                    assert video.path is not None
                    out[video.path] = outcome
                    if new_key is not None:
                        probed += 1
                        cache.put(new_key, {"error": outcome} if isinstance(outcome, str) else outcome.to_json())
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            cache.close()
        self.counts["probed"] = probed
        log.info("video folder %s: %d videos, %d probed, %d from the probe cache", folder, len(videos), probed,
                 len(videos) - probed)
        return out

    def _cache_file(self, folder: Path) -> Path | None:
        if self.context.cache_dir is None:
            return None
        digest = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:16]
        return self.context.cache_dir / ".probes" / f"{digest}.jsonl"

    def _pairs(self, video: _Video, probe: VideoProbe) -> Iterator[Record | BadRecord]:
        """The records of one probed video, or the reason it has none."""
        o = self.options
        assert video.path is not None
        roles = {m: col for m, col in self.columns.items() if col in ("image", "audio", "label")}
        spans = []
        for role, span, missing in (("image", probe.video, "no video stream"),
                                    ("audio", probe.audio, "no audio stream")):
            wanted = [m for m, col in roles.items() if col == role]
            if not wanted:
                continue
            if span is None:
                yield BadRecord(video.id, missing, modality=wanted[0])
                return
            spans.append(span)
        start = max((s for s, _ in spans), default=0.0)
        end = min((e for _, e in spans), default=0.0)
        if end - start < o.min_seconds:
            yield BadRecord(video.id, f"video too short: {max(end - start, 0.0):.2f} s (minimum {o.min_seconds:g} s)")
            return
        for k, t in enumerate(frame_times(start, end, o.frames)):
            items: dict[str, Any] = {}
            for modality, role in roles.items():
                if role == "image":
                    items[modality] = VideoFrame(video.path, t)
                elif role == "audio":
                    items[modality] = AudioSegment(video.path, *audio_window(t, start, end, o.clip_seconds))
                elif video.label:
                    items[modality] = video.label
            yield Record(id=f"{video.id}#{k}", group=video.id, items=items, label=video.label)


def _list_videos(folder: Path, extensions: list[str]) -> dict[str, str]:
    """relative path -> absolute path of every video file under ``folder``, in a stable order."""
    wanted = set(extensions)
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, folder)] = path
    return found
