"""Sentence embeddings from a ``sentence_transformers.SentenceTransformer`` model.

``model`` is a Hugging Face Hub id or a local model folder. A Hub model is
loaded from the local cache without network when it is there; when it is not
and the Hub cannot be reached, :class:`~coembed.registry.WeightsUnavailable`
is raised at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from coembed.registry import Adapter, AdapterOptions, WeightsUnavailable
from coembed_modalities._text import require_text
from coembed_modalities._weights import (
    cached_hub_file,
    describe_error,
    download_blocker,
    hub_cache_dir,
    hub_endpoint,
    path_identity,
)

#: Organisation sentence-transformers prepends to a Hub id without one.
DEFAULT_ORGANISATION = "sentence-transformers"


class SentenceTransformerOptions(AdapterOptions):
    """Options of ``text/sentence-transformers``."""

    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A Hugging Face Hub id, or the path of a local model folder written as a path (absolute, or
    starting with ``./``, ``../`` or ``~``): ``models/minilm`` is the Hub repo of that name."""

    normalize: bool = False
    """L2-normalise the embeddings."""

    cache_dir: str | None = None
    """Download cache (``cache_folder``); default: ``SENTENCE_TRANSFORMERS_HOME`` or the Hub cache."""


class SentenceTransformerAdapter(Adapter):
    """Texts -> sentence-transformers sentence embeddings."""

    modality = "text"
    name = "sentence-transformers"
    raw_input = "text"
    Options: ClassVar[type[AdapterOptions]] = SentenceTransformerOptions
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "cache_dir"})
    weights_options: ClassVar[frozenset[str]] = frozenset({"model"})
    options: SentenceTransformerOptions

    @property
    def dim(self) -> int:
        """The model's embedding dimension (loads the model)."""
        model: Any = self.model
        # sentence-transformers 6 renamed get_sentence_embedding_dimension (now deprecated)
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def weights_identity(self) -> str:
        location = self.weights_location("model")
        return f"hf-hub:{self._repo_id()}" if location is None else path_identity(location)

    def _repo_id(self) -> str:
        model = self.options.model
        return model if "/" in model else f"{DEFAULT_ORGANISATION}/{model}"

    @property
    def _cache_folder(self) -> str | None:
        return self.options.cache_dir or os.environ.get("SENTENCE_TRANSFORMERS_HOME")

    def _load_model(self) -> torch.nn.Module:
        from sentence_transformers import SentenceTransformer  # ten seconds to import: only when a model loads

        model = self.options.model
        location = self.weights_location("model")
        local_only = False
        if location is not None:
            if not location.is_dir():
                raise WeightsUnavailable(self._unavailable("no such folder"))
            model = str(location)
        else:
            repo = self._repo_id()
            local_only = cached_hub_file(repo, ["modules.json", "config.json"], self._cache_folder) is not None
            if not local_only:
                blocker = download_blocker(hub_endpoint())
                if blocker:
                    raise WeightsUnavailable(self._unavailable(blocker))
        try:
            return SentenceTransformer(model, device=str(self.device), cache_folder=self._cache_folder,
                                       local_files_only=local_only)
        except Exception as exc:  # hub, file and config errors all mean: not available
            raise WeightsUnavailable(self._unavailable(describe_error(exc))) from exc

    def _unavailable(self, reason: str) -> str:
        model = self.options.model
        local = ("To use a local copy, point at a model folder (as written by SentenceTransformer.save): "
                 "--set modalities.text.model=/path/to/model-folder")
        if self.weights_location("model") is not None:
            return f"sentence-transformers model folder {model!r} could not be loaded: {reason}. {local}."
        repo = self._repo_id()
        return (f"sentence-transformers model {model!r} is not available: {reason}. It is downloaded from the "
                f"Hugging Face Hub repo {repo!r} ({hub_endpoint()}/{repo}). {local}, or pre-populate the "
                f"local Hugging Face cache ({self._cache_folder or hub_cache_dir(None)}) with that repo, "
                f"e.g. `hf download {repo}` on a machine with network access.")

    def load(self, item: Any) -> str:
        """Check that ``item`` is a non-empty string."""
        return require_text(item)

    def collate(self, items: Sequence[str]) -> list[str]:
        """Texts stay strings; the model's tokenizer runs in :meth:`encode`."""
        return list(items)

    def _encode(self, batch: list[str]) -> torch.Tensor:
        model: Any = self.model
        return model.encode(batch, batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False,
                            normalize_embeddings=self.options.normalize)
