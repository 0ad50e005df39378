"""Small, fast adapters for the data tests, and a recipe helper that uses them.

``image/toy`` and ``audio/toy`` decode through :mod:`coembed.media` exactly as
the real CLIP and VGGish adapters do, then compute a few numbers instead of
running a network. ``toy/counting`` takes strings ``"item-<n>"``, logs every
number it encodes to a file and can sleep per batch: the resume test kills it
between shards. The module is importable from a subprocess (``PYTHONPATH=tests``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coembed.media import load_audio, load_image
from coembed.config import Recipe
from coembed.recipe import recipe_from_dict
from coembed.registry import Adapter, AdapterOptions, BadItem


class ToyOptions(AdapterOptions):
    dim: int = 8
    seed: int = 0


class _Projected(Adapter):
    """Features -> a fixed random linear map (so vectors depend on the input, deterministically)."""

    Options = ToyOptions
    n_features: int

    @property
    def dim(self) -> int:
        return self.options.dim

    def _load_model(self) -> torch.nn.Module:
        g = torch.Generator().manual_seed(self.options.seed)
        layer = torch.nn.Linear(self.n_features, self.options.dim, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(self.options.dim, self.n_features, generator=g))
        return layer

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device))


class ToyImageAdapter(_Projected):
    """A 4x4 thumbnail of the RGB image (any input :func:`load_image` takes)."""

    modality = "image"
    name = "toy"
    n_features = 48

    def load(self, item: Any) -> torch.Tensor:
        image = load_image(item).resize((4, 4))
        return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)


class ToyAudioAdapter(_Projected):
    """Level and spectrum summary of the audio at 8 kHz mono (any input :func:`load_audio` takes)."""

    modality = "audio"
    name = "toy"
    n_features = 6
    sample_rate = 8000

    def load(self, item: Any) -> torch.Tensor:
        wave = load_audio(item, self.sample_rate)
        x = wave.samples.astype(np.float64)
        if len(x) < 64:
            raise BadItem(f"audio too short for the toy adapter: {len(x)} samples")
        spectrum = np.abs(np.fft.rfft(x))
        freqs = np.fft.rfftfreq(len(x), 1.0 / self.sample_rate)
        peak = float(freqs[int(np.argmax(spectrum))]) / 1000.0
        rms = float(np.sqrt(np.mean(x**2)))
        zcr = float(np.mean(np.abs(np.diff(np.sign(x))) > 0))
        return torch.tensor([rms, np.log1p(rms * 100), zcr, peak, wave.duration, 1.0], dtype=torch.float32)


class CountingOptions(AdapterOptions):
    dim: int = 4
    log: str | None = None     # file each encoded number is appended to
    delay: float = 0.0         # seconds of sleep per encoded batch
    die_at: int | None = None  # the encoding process exits (as if killed) on the batch holding this number ...
    die_once: str | None = None  # ... the first time only: this file marks that it has died


class CountingAdapter(Adapter):
    """``"item-<n>"`` -> a vector made from n; logs what it encodes; can die once, as a killed process does."""

    modality = "toy"
    name = "counting"
    raw_input = "text"
    Options = CountingOptions
    runtime_options = frozenset({"device", "log", "delay", "die_at", "die_once"})

    @property
    def dim(self) -> int:
        return self.options.dim

    def _load_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def load(self, item: Any) -> torch.Tensor:
        if not isinstance(item, str) or not item.startswith("item-"):
            raise BadItem(f"not a toy item: {item!r}")
        return torch.tensor([float(item.split("-", 1)[1])])

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        numbers = batch[:, 0].tolist()
        if self.options.die_at in numbers and self.options.die_once and not os.path.exists(self.options.die_once):
            Path(self.options.die_once).touch()
            os._exit(1)
        if self.options.log:
            with open(self.options.log, "a", encoding="utf-8") as fh:
                fh.write("".join(f"{int(v)}\n" for v in batch[:, 0].tolist()))
        if self.options.delay:
            time.sleep(self.options.delay)
        n = batch[:, :1]
        return torch.cat([n, n * 2, torch.sin(n), torch.ones_like(n)], dim=1)[:, : self.dim]


TOY_ENTRY_POINTS = {
    "image/toy": "_toy_adapter:ToyImageAdapter",
    "audio/toy": "_toy_adapter:ToyAudioAdapter",
    "toy/counting": "_toy_adapter:CountingAdapter",
}


def register_toys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the toy adapters findable through the real entry-point mechanism."""
    from plugins import install_plugin

    install_plugin(tmp_path, monkeypatch, "coembed-test-toys", TOY_ENTRY_POINTS, {})
    monkeypatch.syspath_prepend(os.path.dirname(__file__))


def toy_recipe(tmp_path: Path, data: dict[str, Any], **overrides: Any) -> Recipe:
    """An image-audio recipe over the toy adapters, with its cache and outputs in ``tmp_path``."""
    raw: dict[str, Any] = {
        "name": "toy",
        "anchor": "image",
        "pairs": [["image", "audio"]],
        "modalities": {"image": {"adapter": "toy", "device": "cpu", "head": {"type": "identity"}},
                       "audio": {"adapter": "toy", "device": "cpu", "head": {"type": "linear"}}},
        "data": {"split": {"validation": 0.34}, **data},
        "extraction": {"batch_size": 4, "num_workers": 0, "shard_size": 8, "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "device": "cpu"},
        "eval": {"plots": False, "report": False},
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return recipe_from_dict(raw, base_dir=tmp_path)
