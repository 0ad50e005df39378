"""The ``generated`` source: a labelled set of paired PNG images, WAV files and captions that coembed writes.

The quickstart's data: real files, written once to a folder and read back
through a manifest, so the whole pipeline (decoding included) runs on them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from pydantic import Field

from coembed.sources.base import BadRecord, Record, Source, SourceOptions
from coembed.sources.manifest import ManifestOptions, read_manifest_rows, records_from_rows



GENERATED_CLASSES = [
    ("red circle", "low hum", (220, 40, 40), 220.0),
    ("green square", "mid tone", (40, 200, 60), 440.0),
    ("blue triangle", "high whistle", (50, 80, 230), 880.0),
    ("yellow cross", "buzz", (230, 210, 40), 330.0),
    ("purple ring", "chirp", (150, 60, 200), 660.0),
    ("cyan bar", "beep", (40, 210, 210), 1320.0),
    ("orange dot", "drone", (250, 140, 30), 110.0),
    ("grey star", "whine", (128, 128, 128), 1760.0),
]


def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw one of the generated classes' shapes centred on ``(cx, cy)`` with radius ``r``."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=colour)
    elif shape == "dot":
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * math.cos(math.pi / 5 * k - math.pi / 2),
                   cy + (r if k % 2 == 0 else r / 2.5) * math.sin(math.pi / 5 * k - math.pi / 2)) for k in range(10)]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class GeneratedOptions(SourceOptions):
    path: str = Field(description="folder the media and manifest.csv are written to (reused when present)")
    classes: int = Field(default=4, ge=2, le=len(GENERATED_CLASSES))
    items_per_class: int = Field(default=30, ge=1)
    image_size: int = Field(default=96, ge=16)
    audio_seconds: float = Field(default=2.0, ge=1.0)
    sample_rate: int = Field(default=16000, ge=8000)


def generate_media(folder: Path, classes: int, items_per_class: int, image_size: int = 96,
                   audio_seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write a labelled set of paired PNG images and WAV files plus ``manifest.csv``.

    Each class has a colour/shape and a tone; each item also has its own
    continuous parameter shown in both modalities (the shape's size and
    position, the tone's pitch offset and amplitude envelope), so pairs can be
    matched within a class too. Deterministic for a seed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    t = np.arange(int(audio_seconds * sample_rate)) / sample_rate
    for c in range(classes):
        shape_label, sound_label, colour, freq = GENERATED_CLASSES[c]
        label = shape_label.split()[1]
        for i in range(items_per_class):
            rid = f"c{c}-{i:04d}"
            u = float(rng.uniform(0.0, 1.0))  # the item's own parameter, shared by both modalities
            image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            r = image_size * (0.12 + 0.3 * u)
            cx = image_size * (0.3 + 0.4 * u)
            cy = image_size * (0.7 - 0.4 * u)
            _draw_shape(draw, shape_label.split()[1], cx, cy, r, colour)
            noise = rng.normal(0, 6, (image_size, image_size, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{rid}.png")
            f = freq * (1.0 + 0.5 * u)
            envelope = 0.2 + 0.6 * (0.5 + 0.5 * np.sin(2 * np.pi * (0.5 + 3.0 * u) * t))
            wave = envelope * np.sin(2 * np.pi * f * t) + rng.normal(0, 0.01, t.shape)
            sf.write(folder / f"{rid}.wav", (0.5 * wave).astype(np.float32), sample_rate, subtype="PCM_16")
            rows.append({"id": rid, "group": rid, "label": label, "image": f"{rid}.png", "audio": f"{rid}.wav",
                         "text": f"a {shape_label} with a {sound_label}"})
    manifest = folder / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)  # written last: its presence means the set is complete
    return manifest


class GeneratedSource(Source):
    """Labelled image/audio/text triples that coembed generates and writes to disk."""

    name = "generated"
    Options = GeneratedOptions
    options: GeneratedOptions

    def __iter__(self) -> Iterator[Record | BadRecord]:
        o = self.options
        folder = self.context.resolve_path(o.path)
        stamp = folder / "generated.json"
        spec = o.model_dump() | {"seed": self.context.seed}
        manifest = folder / "manifest.csv"
        if not (manifest.is_file() and _read_stamp(stamp) == spec):
            generate_media(folder, o.classes, o.items_per_class, o.image_size, o.audio_seconds,
                           o.sample_rate, seed=self.context.seed)
            tmp = stamp.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(spec))
            os.replace(tmp, stamp)  # a killed run leaves no half-written stamp
        manifest_options = ManifestOptions(path=str(manifest))
        yield from records_from_rows(read_manifest_rows(manifest), manifest_options, self.columns,
                                     self.context.kinds, folder)


def _read_stamp(stamp: Path) -> Any:
    """The options a generated set was written with; ``None`` when the stamp is missing or unreadable."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
