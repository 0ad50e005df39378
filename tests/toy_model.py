"""A small CoEmbedder over the toy plugin adapter, for tests of the model's plumbing (fast, deterministic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coembed import CoEmbedder
from coembed.recipe import HeadConfig
from coembed.registry import create_adapter
from plugins import TOY_ADAPTER_SOURCE, install_plugin

#: Two items the toy adapter reads (4 numbers each).
VECTORS = [np.array([1.0, 0.0, 2.0, -1.0], dtype=np.float32), np.array([0.5, 0.5, -0.5, 3.0], dtype=np.float32)]


@pytest.fixture
def toy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CoEmbedder:
    """Modalities ``anchor`` (identity head) and ``other`` (MLP head), both served by ``toy/vector``."""
    install_plugin(tmp_path, monkeypatch, "toy-plugin", {"toy/vector": "toy_adapter:ToyVectorAdapter"},
                   {"toy_adapter": TOY_ADAPTER_SOURCE})
    adapters = {"anchor": create_adapter("toy/vector", dim=8, device="cpu"),
                "other": create_adapter("toy/vector", dim=4, seed=1, device="cpu")}
    torch.manual_seed(0)
    return CoEmbedder.from_adapters("anchor", adapters, {"anchor": HeadConfig(type="identity"),
                                                         "other": HeadConfig(type="mlp", hidden_dim=6)})
