"""``video/clip-frames``: a video file -> the mean of CLIP image embeddings of frames sampled from it.

The adapter is coembed's ``image/clip`` with a different ``load``: the same
options, weights, preprocessing and (shared) model, so CLIP's loading code is
not copied here. ``load`` (run in DataLoader workers, no model) probes the
video with :func:`coembed.media.probe_video`, decodes ``frames`` frames evenly
spaced over its video stream with :func:`coembed.media.read_video_frame` and
preprocesses each for CLIP; ``encode`` runs CLIP's image tower over every
frame of the batch at once and averages each video's frames.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import torch
from pydantic import Field

from coembed.media import VideoFrame, check_file, probe_video, read_video_frame
from coembed.registry import AdapterOptions, BadItem, SampleItems
from coembed_modalities.clip import ClipImageAdapter, ClipOptions


class VideoFramesOptions(ClipOptions):
    """The options of ``image/clip`` (``model``, ``pretrained``, ``cache_dir``, ``device``) and ``frames``."""

    frames: int = Field(default=8, gt=0, description="frames sampled evenly over the video, mean-pooled")


class VideoFramesAdapter(ClipImageAdapter):
    """Video files -> mean CLIP image embedding of ``frames`` evenly spaced frames."""

    modality = "video"
    name = "clip-frames"
    Options: ClassVar[type[AdapterOptions]] = VideoFramesOptions
    options: VideoFramesOptions

    @classmethod
    def sample_items(cls, folder: Path) -> SampleItems:
        """Two short videos (a left-to-right and a top-to-bottom gradient that brightens) and a text file
        named like a video, for ``coembed modalities --check``."""
        videos = [write_sample_video(folder / f"sample-{i}.mp4", horizontal=i == 0) for i in range(2)]
        (folder / "not-a-video.mp4").write_text("this is not a video")
        return SampleItems([str(v) for v in videos], str(folder / "not-a-video.mp4"))

    def load(self, item: Any) -> torch.Tensor:
        """``[frames, 3, size, size]``: the sampled frames of the video file ``item``, preprocessed for CLIP."""
        if not isinstance(item, (str, os.PathLike)):
            raise BadItem(f"a video is a file path, not {type(item).__name__}")
        path = str(check_file(item))
        span = probe_video(path).video
        if span is None:
            raise BadItem("no video stream")
        start, end = span
        n = self.options.frames
        times = start + (end - start) * (np.arange(n) + 0.5) / n
        return torch.stack([super(VideoFramesAdapter, self).load(read_video_frame(VideoFrame(path, float(t))))
                            for t in times])

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[videos, frames, 3, size, size]``."""
        return torch.stack(list(items))

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        videos, frames = batch.shape[:2]
        embeddings = super()._encode(batch.flatten(0, 1))
        return embeddings.view(videos, frames, -1).mean(dim=1)


def write_sample_video(path: Path, horizontal: bool = True, seconds: float = 1.0, fps: int = 8,
                       size: int = 64) -> Path:
    """A small real video file (mpeg4): a gradient whose brightness grows over time."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.tile(ramp, (size, 1)) if horizontal else np.tile(ramp[:, None], (1, size))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(round(seconds * fps)):
            level = (base * (0.3 + 0.7 * i / max(1, seconds * fps - 1))).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.stack([level, level[::-1], 255 - level], axis=-1), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
