"""The trained co-embedder: frozen adapters + projection heads into one anchor space.

A saved model is a folder::

    config.json          format version, coembed version, anchor, and per modality:
                         adapter key, adapter config, encoder fingerprint, input dim,
                         head config
    heads.safetensors    the heads' weights (``<modality>.<param>``)
    README.md            a model card

Loading is strict: no pickle, no code from the folder, every head weight
present with its expected shape, and each head's input dimension and encoder
fingerprint checked against the adapter that will feed it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coembed.heads import build_head
from coembed.recipe import HeadConfig
from coembed.registry import Adapter, create_adapter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "heads.safetensors"
FORMAT_VERSION = 1


class ModelLoadError(ValueError):
    """A saved model cannot be loaded safely; the message says why."""


@dataclass
class ModalitySpec:
    """How one modality reaches the shared space."""

    adapter: str                 # "audio/vggish"
    adapter_config: dict[str, Any]
    fingerprint: str
    input_dim: int
    head: dict[str, Any]         # a HeadConfig as a dict

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(**self.head)


def _version() -> str:
    from coembed import __version__

    return __version__


class CoEmbedder(nn.Module):
    """Embeds raw inputs of several modalities into one shared space.

    Encoders load lazily, once, only for the modalities used.
    """

    def __init__(self, anchor: str, modalities: dict[str, ModalitySpec], output_dim: int,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.anchor = anchor
        self.specs = dict(modalities)
        self.output_dim = output_dim
        self.metadata = dict(metadata or {})
        self.heads = nn.ModuleDict({m: build_head(s.head_config, s.input_dim, output_dim)
                                    for m, s in self.specs.items()})
        self._adapters: dict[str, Adapter] = {}
        self.device_override: str | None = None

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_adapters(cls, anchor: str, adapters: dict[str, Adapter], heads: dict[str, HeadConfig],
                      metadata: dict[str, Any] | None = None) -> "CoEmbedder":
        specs = {m: ModalitySpec(a.key(), a.config(), a.fingerprint, a.dim, heads[m].model_dump())
                 for m, a in adapters.items()}
        model = cls(anchor, specs, adapters[anchor].dim, metadata)
        model._adapters.update(adapters)
        return model

    @property
    def modalities(self) -> list[str]:
        return list(self.specs)

    def adapter(self, modality: str) -> Adapter:
        """The frozen encoder of ``modality``, created on first use and checked against the head."""
        if modality not in self.specs:
            raise KeyError(f"this model has no {modality!r} modality; it has: {', '.join(self.specs)}")
        if modality not in self._adapters:
            spec = self.specs[modality]
            options = dict(spec.adapter_config)
            if self.device_override:
                options["device"] = self.device_override
            adapter = create_adapter(spec.adapter, **options)
            check_adapter_matches(modality, spec, adapter)
            self._adapters[modality] = adapter
        return self._adapters[modality]

    # -- embedding -----------------------------------------------------------------
    def project(self, modality: str, encoder_vectors: torch.Tensor | np.ndarray, normalize: bool = True) -> torch.Tensor:
        """Map encoder embeddings of ``modality`` into the shared space."""
        head = self.heads[modality]
        x = torch.as_tensor(encoder_vectors, dtype=torch.float32)
        device = next(iter(head.parameters()), x).device
        with torch.inference_mode():
            out = head(x.to(device)).float()
        return F.normalize(out, dim=-1) if normalize else out

    def embed_items(self, modality: str, items: Sequence[Any], *, batch_size: int = 32,
                    normalize: bool = True) -> torch.Tensor:
        """Raw items of one modality -> ``[n, output_dim]`` vectors in the shared space."""
        adapter = self.adapter(modality)
        return self.project(modality, adapter.encode_items(list(items), batch_size=batch_size), normalize)

    # -- save / load -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "coembed_version": _version(),
            "anchor": self.anchor,
            "output_dim": self.output_dim,
            "modalities": {m: asdict(s) for m, s in self.specs.items()},
            "metadata": self.metadata,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))
        state = {f"{m}.{k}": v.detach().cpu().contiguous() for m, head in self.heads.items()
                 for k, v in head.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | None = None) -> "CoEmbedder":
        directory = Path(path)
        config = read_config(directory / CONFIG_NAME)
        specs = {m: ModalitySpec(**s) for m, s in config["modalities"].items()}
        model = cls(config["anchor"], specs, int(config["output_dim"]), config.get("metadata"))
        from safetensors.torch import load_file

        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelLoadError(f"{weights} is missing")
        state = load_file(str(weights))
        for m, head in model.heads.items():
            sub = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(f"{m}.")}
            try:
                head.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise ModelLoadError(f"head weights of {m!r} do not match its config: {exc}") from None
        unknown = [k for k in state if k.split(".", 1)[0] not in model.heads]
        if unknown:
            raise ModelLoadError(f"{weights} holds weights of no declared modality: {unknown[:5]}")
        model.device_override = device
        model.eval()
        return model


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: not a coembed model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ModelLoadError(f"{path} has no format_version: not a coembed model config")
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} was written by coembed {config.get('coembed_version', '?')} in model format {version}; "
            f"this coembed ({_version()}) reads format {FORMAT_VERSION} or older: upgrade coembed")
    return config


def check_adapter_matches(modality: str, spec: ModalitySpec, adapter: Adapter) -> None:
    """Refuse to feed a head from an encoder other than the one it was trained on."""
    if adapter.dim != spec.input_dim:
        raise ModelLoadError(
            f"{modality}: the head expects {spec.input_dim}-dim input but adapter {adapter.key()} "
            f"gives {adapter.dim}-dim vectors")
    if adapter.fingerprint != spec.fingerprint:
        raise ModelLoadError(
            f"{modality}: the head was trained on encoder {spec.fingerprint} but adapter {adapter.key()} "
            f"with {adapter.config()} is {adapter.fingerprint}")
