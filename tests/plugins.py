"""Register adapters in tests through the real entry-point mechanism.

A temporary ``*.dist-info`` folder with an ``entry_points.txt`` is put on
``sys.path``: ``importlib.metadata`` then finds it exactly as it finds an
installed third-party plugin.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, distribution: str,
                   entry_points: dict[str, str], modules: dict[str, str], group: str = "coembed.modalities") -> Path:
    """Write ``modules`` (name -> source) and a dist-info declaring ``entry_points`` in ``group``; return the folder."""
    root = tmp_path / f"site-{distribution}"
    root.mkdir()
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    # importlib.metadata reads the name up to the first "-" of the folder name: "coembed-x-0.1" would be a
    # second "coembed" and hide coembed's own entry points, so the folder takes the normalised name
    info = root / f"{distribution.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(root))
    return root


TOY_ADAPTER_SOURCE = '''
import numpy as np
import torch
from coembed.registry import Adapter, AdapterOptions, BadItem


class ToyOptions(AdapterOptions):
    dim: int = 8
    seed: int = 0


class ToyVectorAdapter(Adapter):
    """Reads a .npy vector file (or takes an array) and applies a fixed random linear map."""

    modality = "toy"
    name = "vector"
    Options = ToyOptions

    @property
    def dim(self):
        return self.options.dim

    def _load_model(self):
        g = torch.Generator().manual_seed(self.options.seed)
        layer = torch.nn.Linear(4, self.options.dim)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(self.options.dim, 4, generator=g))
            layer.bias.zero_()
        return layer

    def load(self, item):
        if isinstance(item, str):
            try:
                item = np.load(item)
            except Exception as exc:
                raise BadItem(f"not a vector file ({type(exc).__name__})") from exc
        array = np.asarray(item, dtype=np.float32)
        if array.shape != (4,):
            raise BadItem(f"expected 4 values, got shape {array.shape}")
        return torch.from_numpy(array)

    def _encode(self, batch):
        return self.model(batch.to(self.device))
'''

#: Two items the toy adapter reads (4 numbers each).
VECTORS = [np.array([1.0, 0.0, 2.0, -1.0], dtype=np.float32), np.array([0.5, 0.5, -0.5, 3.0], dtype=np.float32)]
