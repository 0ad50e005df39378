"""Labelled tone data and a tone "audio encoder" for evaluation tests.

Class ``c`` is a pure tone at ``FREQUENCIES[c]`` (one second, 16 kHz, a little
noise). The ``audio/tone`` adapter, registered through a real entry point,
encodes a clip as the magnitude of its Fourier coefficient at each of those
frequencies, normalised: a clip of class ``c`` encodes to (nearly) the unit
vector ``e_c``. A linear head whose column ``c`` is a text vector therefore
sends every clip of class ``c`` to that vector, which fixes zero-shot accuracy
by construction.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from plugins import install_plugin

FREQUENCIES = (220.0, 330.0, 440.0, 550.0, 660.0, 770.0)
RATE = 16000
CLASSES = ("dog", "church_bells", "rain", "crying_baby", "clock_tick", "sea_waves")

TONE_ADAPTER_SOURCE = '''
import numpy as np
import torch
from coembed.media import load_audio
from coembed.registry import Adapter, AdapterOptions

FREQUENCIES = (220.0, 330.0, 440.0, 550.0, 660.0, 770.0)


class ToneOptions(AdapterOptions):
    frequencies: tuple[float, ...] = FREQUENCIES


class ToneAdapter(Adapter):
    """Audio -> normalised Fourier magnitudes at fixed frequencies."""

    modality = "audio"
    name = "tone"
    Options = ToneOptions

    @property
    def dim(self):
        return len(self.options.frequencies)

    def _load_model(self):
        return torch.nn.Identity()

    def load(self, item):
        wave = load_audio(item, 16000)  # a file, or a span of a video (AudioSegment); BadItem when unreadable
        x = wave.samples
        t = np.arange(len(x)) / wave.sample_rate
        basis = np.exp(-2j * np.pi * np.outer(self.options.frequencies, t))
        features = np.abs(basis @ x) / len(x)
        return torch.from_numpy((features / max(np.linalg.norm(features), 1e-12)).astype(np.float32))

    def _encode(self, batch):
        return self.model(batch)
'''


def install_tone_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``audio/tone`` through an entry point of a temporary distribution."""
    install_plugin(tmp_path, monkeypatch, "tone-plugin", {"audio/tone": "coembed_test_tone:ToneAdapter"},
                   {"coembed_test_tone": TONE_ADAPTER_SOURCE})


def write_tone(path: Path, cls: int, seed: int) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(RATE) / RATE
    wave = 0.5 * np.sin(2 * np.pi * FREQUENCIES[cls] * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.01, RATE)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), RATE, subtype="PCM_16")
    return path


def write_tone_manifest(folder: Path, per_class: list[int], captions: bool = False) -> Path:
    """``manifest.csv`` with id, group, label, audio (and a caption in ``text``): ``per_class[c]`` clips of class c.

    Clips ``2k`` and ``2k + 1`` of a class share their caption (duplicate items on the text side).
    """
    rows = []
    for c, n in enumerate(per_class):
        for i in range(n):
            rid = f"{CLASSES[c]}-{i:02d}"
            write_tone(folder / f"{rid}.wav", c, seed=100 * c + i)
            row = {"id": rid, "group": rid, "label": CLASSES[c], "audio": f"{rid}.wav"}
            if captions:
                row["text"] = f"the sound of {CLASSES[c].replace('_', ' ')}, take {i // 2}"
            rows.append(row)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_esc50(folder: Path, per_class_per_fold: int, folds: int = 5, classes: int = 3) -> Path:
    """An ESC-50 layout: ``audio/<fold>-<n>-A-<target>.wav`` and ``meta/esc50.csv``."""
    rows = []
    for fold in range(1, folds + 1):
        for c in range(classes):
            for i in range(per_class_per_fold):
                name = f"{fold}-{1000 * c + i}-A-{c}.wav"
                write_tone(folder / "audio" / name, c, seed=1000 * fold + 10 * c + i)
                rows.append({"filename": name, "fold": fold, "target": c, "category": CLASSES[c],
                             "esc10": "True" if c == 0 else "False", "src_file": f"{1000 * c + i}", "take": "A"})
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    with (folder / "meta" / "esc50.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder
