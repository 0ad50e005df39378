"""CLIP image and text encoders from open_clip: the anchor space of coembed.

``image/clip`` and ``text/clip`` with the same ``model``, ``pretrained`` and
device share one loaded model. Image preprocessing is open_clip's own eval
transform for the model and weights, built from open_clip's configuration
tables without loading the model, so it runs in DataLoader workers.

Weights come from an open_clip pretrained tag (Hugging Face Hub or URL, as
open_clip resolves it), an ``hf-hub:org/repo`` id, or a local checkpoint file.
They are looked up in the local caches first; when they are missing and cannot
be downloaded, :class:`~coembed.registry.WeightsUnavailable` is raised at once,
never a silent fallback to random weights.
"""

from __future__ import annotations

import difflib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, ClassVar, cast

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from pydantic import field_validator

from coembed.layout import weights_path
from coembed.media import load_image
from coembed.registry import Adapter, AdapterOptions, WeightsUnavailable
from coembed_modalities._text import require_text
from coembed_modalities._weights import (
    cached_hub_file,
    describe_error,
    download_blocker,
    hub_cache_dir,
    hub_endpoint,
    none_if_none_string,
    path_identity,
)

HF_HUB_PREFIX = "hf-hub:"
#: Where open_clip caches checkpoints downloaded from a plain URL.
DEFAULT_URL_CACHE = "~/.cache/clip"


class ClipOptions(AdapterOptions):
    """Options shared by ``image/clip`` and ``text/clip``."""

    model: str = "ViT-B-32"
    """open_clip architecture name (one of ``open_clip.list_models()``)."""

    pretrained: str | None = "openai"
    """The weights: an open_clip pretrained tag of ``model``
    (``open_clip.list_pretrained_tags_by_model(model)``), ``hf-hub:org/repo``
    (a Hub repo holding ``open_clip_model.safetensors`` or
    ``open_clip_pytorch_model.bin``), or the path of a local checkpoint file.
    ``None``/``"none"`` builds the architecture with random weights (tests).

    Preprocessing (mean, std, resize mode, interpolation) and QuickGELU follow
    the tag, or the tag that names the same ``hf-hub`` repo; any other repo or
    file gets open_clip's defaults for the architecture."""

    cache_dir: str | None = None
    """Download cache: the Hugging Face Hub cache for Hub weights, else the folder
    for URL downloads (open_clip's ``~/.cache/clip``). Default: the libraries' own."""

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        return none_if_none_string(value)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        known = open_clip.list_models()
        if value not in known:
            close = difflib.get_close_matches(value, known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise ValueError(f"unknown open_clip model {value!r}{hint}")
        return value


@dataclass(frozen=True)
class _Source:
    """Where the weights of one ``(model, pretrained)`` pair come from; computed without network."""

    kind: str
    """``"none"`` (random init), ``"tag"``, ``"hf-hub"`` or ``"file"``."""
    name: str
    """``"none"``, the normalised tag, the Hub repo id, or the absolute file path."""
    hf_repo: str = ""
    hf_file: str = ""
    """File inside ``hf_repo``; empty: open_clip's default names."""
    url: str = ""
    quick_gelu: bool = False
    """The weights were trained with QuickGELU activations."""
    preprocess: tuple[tuple[str, Any], ...] = ()
    """Preprocessing values (mean, std, interpolation, resize mode) that come with the weights."""


def _tag_source(kind: str, name: str, cfg: dict[str, Any]) -> _Source:
    hf_repo, hf_file = os.path.split(cfg.get("hf_hub", "")) if cfg.get("hf_hub") else ("", "")
    preprocess = merge_preprocess_dict({}, cfg)
    preprocess.pop("size", None)
    return _Source(
        kind,
        name,
        hf_repo=hf_repo,
        hf_file=hf_file,
        url=cfg.get("url", ""),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        preprocess=tuple(sorted(preprocess.items())),
    )


@cache
def _weights_source(model: str, pretrained: str | None) -> _Source:
    """Classify ``pretrained`` for ``model`` using open_clip's pretrained table (no network)."""
    if pretrained is None:
        return _Source("none", "none")
    if pretrained.startswith(HF_HUB_PREFIX):
        repo = pretrained[len(HF_HUB_PREFIX):].strip("/")
        # A repo that one of open_clip's tags points at brings that tag's preprocessing.
        for tag in open_clip.list_pretrained_tags_by_model(model):
            cfg = open_clip.get_pretrained_cfg(model, tag)
            if cfg.get("hf_hub") and os.path.split(cfg["hf_hub"])[0] == repo:
                return _tag_source("hf-hub", repo, cfg)
        return _Source("hf-hub", repo, hf_repo=repo)
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if cfg:
        return _tag_source("tag", pretrained.lower().replace("-", "_"), cfg)
    path = weights_path(pretrained, hub_ids=False)  # neither a tag nor hf-hub: open_clip reads a checkpoint file
    assert path is not None
    return _Source("file", str(path))


def _hub_candidates(hf_file: str) -> list[str]:
    """Files open_clip tries in a Hub repo, in its order (safetensors first)."""
    if not hf_file or hf_file == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if hf_file.endswith((".bin", ".pth")):
        return [hf_file[:-4] + ".safetensors", hf_file]
    return [hf_file]


@cache
def _image_transform(model: str, pretrained: str | None) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for ``model`` with ``pretrained``, as ``create_model`` would set it up."""
    cfg = merge_preprocess_dict(PreprocessCfg(), dict(_weights_source(model, pretrained).preprocess))
    cfg["size"] = open_clip.get_model_config(model)["vision_cfg"].get("image_size", PreprocessCfg.size)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@cache
def _tokenizer(model: str, cache_dir: str | None) -> Callable[[list[str]], torch.Tensor]:
    return open_clip.get_tokenizer(model, cache_dir=cache_dir)


#: Loaded models by ``(model, weights, device)``; an entry lives while an adapter holds its model.
_MODELS: weakref.WeakValueDictionary[tuple[str, str, str], torch.nn.Module] = weakref.WeakValueDictionary()
_MODELS_LOCK = threading.Lock()


class _ClipAdapter(Adapter):
    """What ``image/clip`` and ``text/clip`` share: options, weights and the shared model."""

    Options: ClassVar[type[AdapterOptions]] = ClipOptions
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "cache_dir"})
    weights_options: ClassVar[frozenset[str]] = frozenset({"pretrained"})
    options: ClipOptions

    @property
    def dim(self) -> int:
        return int(open_clip.get_model_config(self.options.model)["embed_dim"])

    @property
    def _clip(self) -> open_clip.CLIP | open_clip.CustomTextCLIP:
        """The loaded (shared) model, typed."""
        return cast("open_clip.CLIP | open_clip.CustomTextCLIP", self.model)

    @property
    def _source(self) -> _Source:
        return _weights_source(self.options.model, self.options.pretrained)

    def weights_location(self, option: str) -> Path | None:
        """``pretrained`` as a local checkpoint file; a tag, an ``hf-hub:`` id or ``None`` is not one."""
        source = self._source
        return Path(source.name) if source.kind == "file" else None

    def weights_identity(self) -> str:
        source = self._source
        if source.kind == "none":
            return "random-init"
        if source.kind == "file":
            return path_identity(source.name)
        if source.kind == "hf-hub":
            return f"{HF_HUB_PREFIX}{source.name}"
        return f"open_clip:{self.options.model}/{source.name}"

    def _load_model(self) -> torch.nn.Module:
        source = self._source
        key = (self.options.model, f"{source.kind}:{source.name}", str(self.device))
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                model = self._create_model(source)
                _MODELS[key] = model
        return model

    def _create_model(self, source: _Source) -> torch.nn.Module:
        checkpoint = self._checkpoint(source)
        try:
            return open_clip.create_model(
                self.options.model,
                pretrained=checkpoint,
                device=self.device,
                # the architecture must match the weights (open_clip only warns on a mismatch)
                force_quick_gelu=source.quick_gelu,
                pretrained_image=False,
                pretrained_text=False,
                cache_dir=self.options.cache_dir,
            )
        except Exception as exc:
            if checkpoint is None:
                raise
            raise WeightsUnavailable(
                f"{self._what()}: the checkpoint {checkpoint} could not be loaded "
                f"({describe_error(exc)})"
            ) from exc

    def _checkpoint(self, source: _Source) -> str | None:
        """Local path of the checkpoint, from the caches or downloaded; ``None`` for random init."""
        if source.kind == "none":
            return None
        if source.kind == "file":
            if not os.path.isfile(source.name):
                raise WeightsUnavailable(self._unavailable(source, "no such file"))
            return source.name
        cache_dir = self.options.cache_dir
        download: Callable[[], str]
        if source.hf_repo:
            found = cached_hub_file(source.hf_repo, _hub_candidates(source.hf_file), cache_dir)
            if found:
                return found
            self._refuse_if_blocked(source, hub_endpoint())
            download = partial(open_clip.download_pretrained_from_hf, source.hf_repo,
                               filename=source.hf_file or None, cache_dir=cache_dir)
        else:
            if not (Path(cache_dir or DEFAULT_URL_CACHE).expanduser() / os.path.basename(source.url)).is_file():
                self._refuse_if_blocked(source, source.url)
            download = partial(open_clip.download_pretrained_from_url, source.url, cache_dir=cache_dir)
        try:
            return download()
        except Exception as exc:  # hub, HTTP and file errors all mean: not available
            raise WeightsUnavailable(self._unavailable(source, describe_error(exc))) from exc

    def _refuse_if_blocked(self, source: _Source, url: str) -> None:
        blocker = download_blocker(url)
        if blocker:
            raise WeightsUnavailable(self._unavailable(source, blocker))

    def _what(self) -> str:
        return f"open_clip weights for model {self.options.model!r} with pretrained={self.options.pretrained!r}"

    def _unavailable(self, source: _Source, reason: str) -> str:
        local = (f"To use a local copy, point at the checkpoint file: "
                 f"--set modalities.{self.modality}.pretrained=/path/to/open_clip_pytorch_model.bin")
        if source.kind == "file":
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(self.options.model)) or "none"
            return (f"{self._what()} are not available: {self.options.pretrained!r} is neither a pretrained "
                    f"tag of {self.options.model} (known tags: {tags}) nor an existing local file ({reason}). "
                    f"{local}.")
        if source.hf_repo:
            files = " or ".join(_hub_candidates(source.hf_file))
            return (f"{self._what()} are not available: {reason}. open_clip downloads them from the "
                    f"Hugging Face Hub repo {source.hf_repo!r} ({hub_endpoint()}/{source.hf_repo}, file {files}). "
                    f"{local}, or pre-populate the local Hugging Face cache "
                    f"({hub_cache_dir(self.options.cache_dir)}) with that repo, e.g. "
                    f"`hf download {source.hf_repo}` on a machine with network access.")
        return (f"{self._what()} are not available: {reason}. open_clip downloads them from {source.url}. "
                f"{local}, or place the downloaded file in {self.options.cache_dir or DEFAULT_URL_CACHE}.")


class ClipImageAdapter(_ClipAdapter):
    """Images -> CLIP image embeddings (``encode_image``, not normalised)."""

    modality = "image"
    name = "clip"

    def load(self, item: Any) -> torch.Tensor:
        """Decode ``item`` with :func:`coembed.media.load_image`, then open_clip's eval preprocessing."""
        transform = _image_transform(self.options.model, self.options.pretrained)
        return transform(load_image(item))

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self._clip.encode_image(batch.to(self.device))


class ClipTextAdapter(_ClipAdapter):
    """Texts -> CLIP text embeddings (``encode_text``, not normalised)."""

    modality = "text"
    name = "clip"
    raw_input = "text"

    def load(self, item: Any) -> str:
        """Check that ``item`` is a non-empty string."""
        return require_text(item)

    def collate(self, items: Sequence[str]) -> torch.Tensor:
        """Tokenize with open_clip's tokenizer for the model: ``[batch, context_length]`` token ids."""
        return _tokenizer(self.options.model, self.options.cache_dir)(list(items))

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self._clip.encode_text(batch.to(self.device))
