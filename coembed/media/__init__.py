"""Decoding raw media: audio of any rate and channel layout, images of any mode, video frames and probes.

Everything that reads an image or a sound goes through here, so adapters and
data sources agree on what a bad item is: a failure raises
:class:`~coembed.errors.BadItem` with a short reason. Adapters call
:func:`load_audio` and :func:`load_image`; the extraction wraps each item in
:func:`decoding`, which carries the run's settings in and the decoders'
measurements out.

============== ================================================================
``items``      what a raw item can be (:class:`AudioSegment`, :class:`VideoFrame`,
               :class:`Waveform`, :class:`MediaRef`) and the checks of a file
``context``    :func:`decoding`: the pixel limit in force, measurements taken
``containers`` opening media containers with PyAV
``video``      a frame of a video as an image; probing a video's streams
``audio``      :func:`load_audio`, levels, resampling, :func:`fit_audio` (short clips)
``image``      :func:`load_image`, any mode to RGB
============== ================================================================
"""

from coembed.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_SILENCE_DB
from coembed.errors import BadItem, OverLimit
from coembed.media.audio import (AUDIO_DB, AUDIO_PADDED, AUDIO_REPEATED, AUDIO_WINDOW, MIN_USABLE_SECONDS,
                                 SILENCE_FLOOR_DB, audio_level_db, fit_audio, load_audio, resample, to_mono)
from coembed.media.containers import open_media, video_stream
from coembed.media.context import FROM_CONTEXT, decoding
from coembed.media.image import load_image, to_rgb
from coembed.media.items import (AudioSegment, MediaRef, VideoFrame, Waveform, as_array, check_file,
                                 check_path_name, safe_text, stat_file)
from coembed.media.video import VideoProbe, probe_video, read_video_frame

__all__ = [
    "AUDIO_DB", "AUDIO_PADDED", "AUDIO_REPEATED", "AUDIO_WINDOW", "DEFAULT_MAX_IMAGE_PIXELS", "MIN_USABLE_SECONDS", "DEFAULT_SILENCE_DB", "FROM_CONTEXT", "SILENCE_FLOOR_DB", "AudioSegment",
    "BadItem", "MediaRef", "OverLimit", "VideoFrame", "VideoProbe", "Waveform", "as_array", "audio_level_db",
    "check_file", "check_path_name", "decoding", "fit_audio", "load_audio", "load_image", "open_media", "probe_video",
    "read_video_frame", "resample", "safe_text", "stat_file", "to_mono", "to_rgb", "video_stream",
]
