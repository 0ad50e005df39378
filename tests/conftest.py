"""Shared fixtures: offline Hugging Face Hub for the whole session, small media file writers, a toy model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from coembed import CoEmbedder

# Set before any test module imports huggingface_hub (which reads it once): tests never download.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def tmp_wav(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a WAV file of noise plus a tone: ``tmp_wav(seconds=2.0, rate=16000, channels=1)``."""
    counter = iter(range(1_000_000))

    def write(seconds: float = 2.0, rate: int = 16000, channels: int = 1, seed: int = 0,
              name: str | None = None, subtype: str = "PCM_16") -> Path:
        import soundfile as sf

        n = round(seconds * rate)
        rng = np.random.default_rng(seed)
        t = np.arange(n) / rate
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * seed) * t)
        samples = (tone[:, None] + 0.05 * rng.standard_normal((n, channels))).astype(np.float32)
        path = tmp_path / (name or f"audio_{next(counter)}.wav")
        sf.write(path, samples, rate, subtype=subtype)
        return path

    return write


@pytest.fixture
def tmp_png(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a PNG image: ``tmp_png(width=64, height=48, mode="RGB", seed=0)``."""
    counter = iter(range(1_000_000))

    def write(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0, name: str | None = None) -> Path:
        from PIL import Image

        rng = np.random.default_rng(seed)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)  # L, RGB or RGBA by shape
        path = tmp_path / (name or f"image_{next(counter)}.png")
        image.save(path, format="PNG")
        return path

    return write


@pytest.fixture
def toy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CoEmbedder:
    """A small CoEmbedder over the toy plugin adapter (fast, deterministic), for tests of the model's plumbing:
    modalities ``anchor`` (identity head) and ``other`` (MLP head), both served by ``toy/vector``."""
    import torch

    from coembed import CoEmbedder
    from coembed.config import HeadConfig
    from coembed.registry import create_adapter
    from plugins import TOY_ADAPTER_SOURCE, install_plugin

    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    adapters = {"anchor": create_adapter("toy/vector", dim=8, device="cpu"),
                "other": create_adapter("toy/vector", dim=4, seed=1, device="cpu")}
    torch.manual_seed(0)
    return CoEmbedder.from_adapters("anchor", adapters, {"anchor": HeadConfig(type="identity"),
                                                         "other": HeadConfig(type="mlp", hidden_dim=6)})
