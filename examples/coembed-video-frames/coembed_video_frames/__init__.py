"""A coembed plugin: the ``video`` modality, CLIP's image encoder mean-pooled over sampled frames."""

from coembed_video_frames.adapter import VideoFramesAdapter, VideoFramesOptions

__all__ = ["VideoFramesAdapter", "VideoFramesOptions"]
