"""What a raw media item can be, and the checks every file goes through before it is decoded.

Items that point into a file (:class:`AudioSegment`, :class:`VideoFrame`) or
elsewhere (:class:`MediaRef`) are small and cheap to pickle, so records can
travel to DataLoader workers that decode them there. A failed check raises
:class:`~coembed.errors.BadItem` with a short reason.
"""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coembed.errors import BadItem


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




def as_array(item: Any) -> np.ndarray | None:
    """A numpy array or a torch tensor as a numpy array; ``None`` for anything else."""
    if isinstance(item, np.ndarray):
        return item
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy()
    return None
