"""The trained co-embedder: frozen adapters + projection heads into one anchor space.

:class:`CoEmbedder` embeds raw inputs of any of its modalities into the shared
space, saves itself as a model folder (:mod:`coembed.model.folder`, with a
model card, :mod:`coembed.model.card`) and loads from a folder, a run or the
Hugging Face Hub (:mod:`coembed.model.hub`).

Encoders whose weights were a local file or folder are identified by content, so
the model loads on another machine with ``adapter_options`` pointing at a copy
of the same weights there (see :meth:`CoEmbedder.from_pretrained`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from coembed import layout
from coembed.config import HeadConfig
from coembed.devices import resolve_device
from coembed.errors import AdapterError, ModelLoadError
from coembed.heads import build_head
from coembed.media import Waveform
from coembed.model.card import write_model_card
from coembed.model.folder import (FORMAT_VERSION, ModalitySpec, ModelConfig, check_adapter_matches,
                                  check_local_weights, copy_record, load_heads, options_problem, read_config,
                                  save_heads, write_config)
from coembed.model.hub import locate_model, upload_folder
from coembed.registry import Adapter, create_adapter, get_adapter_class
from coembed.version import __version__

if TYPE_CHECKING:
    from PIL.Image import Image

Item: TypeAlias = "str | os.PathLike[str] | bytes | Image | np.ndarray | torch.Tensor | tuple[np.ndarray | torch.Tensor, int]"
"""One raw input: a path, bytes, a PIL image, an array (an image, or a waveform with its
sample rate), an ``(array, sample_rate)`` pair, or a string (text)."""
Items: TypeAlias = "Item | list[Item] | tuple[Item, ...]"
"""One item, or a list of items (which may mix kinds)."""


@dataclass
class UsableEmbeddings:
    """What :meth:`CoEmbedder.embed` returns with ``skip_bad=True``: the usable items' vectors, their
    indexes in the input (``vectors[j]`` is ``items[indexes[j]]``), and ``{index: reason}`` of the others."""

    vectors: torch.Tensor | np.ndarray
    indexes: list[int]
    bad: dict[int, str]

    def as_numpy(self) -> UsableEmbeddings:
        vectors = self.vectors.numpy() if isinstance(self.vectors, torch.Tensor) else self.vectors
        return UsableEmbeddings(vectors, self.indexes, self.bad)


class CoEmbedder(nn.Module):
    """Embeds raw inputs of several modalities into one shared space.

    Load a trained model with :meth:`from_pretrained`, embed with :meth:`embed`,
    compare with :meth:`similarity`. Each modality's frozen encoder (its
    adapter) is created lazily, once, the first time that modality is embedded.
    """

    def __init__(self, anchor: str, modalities: dict[str, ModalitySpec], output_dim: int,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.anchor = anchor
        self.specs = dict(modalities)
        self.output_dim = output_dim
        self.metadata = dict(metadata or {})
        self.heads = nn.ModuleDict({m: build_head(s.head, s.input_dim, output_dim) for m, s in self.specs.items()})
        self._adapters: dict[str, Adapter] = {}
        self._device: str | None = None
        #: Adapter options given at load, by modality, over the saved ones (``from_pretrained(adapter_options=...)``).
        self._adapter_overrides: dict[str, dict[str, Any]] = {}
        #: Folder holding the training record (recipe.yaml, metrics.json, figures) used for the model card.
        self.record_dir: Path | None = None
        self.eval()

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_adapters(cls, anchor: str, adapters: dict[str, Adapter], heads: dict[str, HeadConfig],
                      metadata: dict[str, Any] | None = None, output_dim: int | None = None) -> CoEmbedder:
        """A model (with freshly initialised heads) around already created adapters; the shared space has
        ``output_dim`` dimensions (default: the anchor encoder's)."""
        specs = {m: ModalitySpec.of(a, heads[m]) for m, a in adapters.items()}
        model = cls(anchor, specs, output_dim or adapters[anchor].dim, metadata)
        model._adapters.update(adapters)
        return model

    @property
    def modalities(self) -> list[str]:
        """The modality names this model embeds (its ``embed`` keywords)."""
        return list(self.specs)

    def adapter(self, modality: str) -> Adapter:
        """The frozen encoder of ``modality``, created on first use and checked against its head."""
        if modality not in self.specs:
            raise ValueError(f"this model has no {modality!r} modality; it has: {', '.join(self.specs)}")
        if modality not in self._adapters:
            spec = self.specs[modality]
            overrides = self._adapter_overrides.get(modality, {})
            try:
                options = get_adapter_class(spec.adapter).saved_options(spec.adapter_config)
                if self._device is not None:
                    options["device"] = self._device
                options.update(overrides)
                adapter = create_adapter(spec.adapter, **options)
            except ValidationError as exc:
                given = f", with adapter_options {overrides}" if overrides else ""
                raise ModelLoadError(f"{modality}: adapter {spec.adapter} does not accept the options this model "
                                     f"was trained with{given} ({options_problem(exc)})") from None
            except AdapterError as exc:
                raise AdapterError(f"{modality}: this model needs adapter {spec.adapter!r}: {exc}") from exc
            check_local_weights(modality, spec, adapter)
            check_adapter_matches(modality, spec, adapter)
            self._adapters[modality] = adapter
        return self._adapters[modality]

    # -- embedding -----------------------------------------------------------------
    def project(self, modality: str, encoder_vectors: torch.Tensor | np.ndarray,
                normalize: bool = True) -> torch.Tensor:
        """Map encoder embeddings of ``modality`` into the shared space (on the head's device)."""
        head = self.heads[modality]
        x = torch.as_tensor(encoder_vectors, dtype=torch.float32)
        device = next(iter(head.parameters()), x).device
        with torch.no_grad():
            out = head(x.to(device)).float()
        return F.normalize(out, dim=-1) if normalize else out

    def embed_items(self, modality: str, items: Sequence[Any], *, batch_size: int = 32,
                    normalize: bool = True) -> torch.Tensor:
        """Raw items of one modality, as its adapter takes them -> ``[n, output_dim]`` CPU vectors."""
        adapter = self.adapter(modality)
        return self.project(modality, adapter.encode_items(list(items), batch_size=batch_size), normalize).cpu()

    def embed_usable_items(self, modality: str, items: Sequence[Any], *, batch_size: int = 32,
                           normalize: bool = True) -> UsableEmbeddings:
        """Like :meth:`embed_items`, but an unusable item is skipped and reported instead of raised."""
        vectors, indexes, bad = self.adapter(modality).encode_usable_items(list(items), batch_size=batch_size)
        return UsableEmbeddings(self.project(modality, vectors, normalize).cpu(), indexes,
                                {i: reason for i, (reason, _) in bad.items()})

    @overload
    def embed(self, *, image: Items | None = None, audio: Items | None = None, text: str | Sequence[str] | None = None,
              sample_rate: int | None = None, batch_size: int = 32, normalize: bool = True,
              as_numpy: Literal[False] = False, skip_bad: Literal[False] = False, **inputs: Items) -> torch.Tensor: ...

    @overload
    def embed(self, *, image: Items | None = None, audio: Items | None = None, text: str | Sequence[str] | None = None,
              sample_rate: int | None = None, batch_size: int = 32, normalize: bool = True,
              as_numpy: Literal[True], skip_bad: Literal[False] = False, **inputs: Items) -> np.ndarray: ...

    @overload
    def embed(self, *, image: Items | None = None, audio: Items | None = None, text: str | Sequence[str] | None = None,
              sample_rate: int | None = None, batch_size: int = 32, normalize: bool = True, as_numpy: bool = False,
              skip_bad: Literal[True], **inputs: Items) -> UsableEmbeddings: ...

    def embed(self, *, image: Items | None = None, audio: Items | None = None, text: str | Sequence[str] | None = None,
              sample_rate: int | None = None, batch_size: int = 32, normalize: bool = True, as_numpy: bool = False,
              skip_bad: bool = False, **inputs: Items) -> torch.Tensor | np.ndarray | UsableEmbeddings:
        """Embed the inputs of one modality into the shared space.

        Pass exactly one modality per call, by its name in this model
        (``image=``, ``audio=``, ``text=``, or any other modality the model has,
        e.g. ``caption=``)::

            model.embed(audio=["dog.wav", (waveform, 44100), wav_bytes])
            model.embed(image=pil_image)             # one item -> one row
            model.embed(text=["a dog barking", "rain"])

        Args:
            image, audio, text, **inputs: one item or a list of items. A list is
                always many items; anything else is one item (one row). Items may
                be paths, bytes, PIL images, numpy/torch arrays, ``(array,
                sample_rate)`` pairs or strings, whatever the modality's adapter
                reads, and a list may mix them. An audio array is ``[samples]``
                or ``[samples, channels]`` (``[channels, samples]`` is
                recognised by its shorter first axis).
            sample_rate: the sample rate of audio arrays given without one.
            batch_size: items encoded at once.
            normalize: L2-normalise the vectors (cosine geometry of the shared space).
            as_numpy: return a float32 numpy array instead of a torch tensor.
            skip_bad: skip the items that cannot be used instead of raising, and
                return a :class:`UsableEmbeddings`: the vectors of the usable
                items, their indexes in the input and the reason for each other one.

        Returns:
            ``[n, output_dim]`` float32 vectors on the CPU, without gradients
            (with ``skip_bad``, a :class:`UsableEmbeddings` holding them).

        Raises:
            ValueError: no or several modalities, an unknown one, or an audio
                array without a sample rate.
            coembed.BadItem: an item cannot be used (without ``skip_bad``); the
                message names its index and the reason, ``"item 3: audio too short ..."``.
        """
        given = {m: v for m, v in {"image": image, "audio": audio, "text": text, **inputs}.items() if v is not None}
        if len(given) != 1:
            names = ", ".join(f"{m}=" for m in self.specs)
            got = ", ".join(given) or "none"
            raise ValueError(f"embed() takes the inputs of exactly one modality per call ({names}); got: {got}")
        ((modality, raw),) = given.items()
        if modality not in self.specs:
            raise ValueError(f"this model has no {modality!r} modality; it has: {', '.join(self.specs)}")
        items = _item_list(raw)
        if self.specs[modality].kind == "audio":
            items = [_audio_item(x, sample_rate, i) for i, x in enumerate(items)]
        elif sample_rate is not None:
            raise ValueError(f"sample_rate applies to audio; {modality!r} is {self.specs[modality].kind}")
        if skip_bad:
            usable = self.embed_usable_items(modality, items, batch_size=batch_size, normalize=normalize)
            return usable.as_numpy() if as_numpy else usable
        vectors = self.embed_items(modality, items, batch_size=batch_size, normalize=normalize)
        return vectors.numpy() if as_numpy else vectors

    @staticmethod
    def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Cosine similarity of every row of ``a`` with every row of ``b``: ``[len(a), len(b)]``.

        Numpy in both gives numpy out; otherwise a torch tensor on ``a``'s device.
        """
        ta, tb = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        ta, tb = ta.reshape(1, -1) if ta.ndim == 1 else ta, tb.reshape(1, -1) if tb.ndim == 1 else tb
        sims = F.normalize(ta, dim=-1) @ F.normalize(tb.to(ta.device), dim=-1).T
        return sims.numpy() if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else sims

    # -- save / load -----------------------------------------------------------------
    def folder_config(self) -> ModelConfig:
        """The content of ``config.json``, typed."""
        return ModelConfig(format_version=FORMAT_VERSION, coembed_version=__version__, anchor=self.anchor,
                           output_dim=self.output_dim, modalities=self.specs, metadata=self.metadata)

    def config(self) -> dict[str, Any]:
        """The content of ``config.json`` (JSON-serialisable)."""
        return self.folder_config().model_dump(mode="json")

    def head_state(self) -> dict[str, torch.Tensor]:
        """Every head's weights, as ``heads.safetensors`` holds them (``"<modality>.<param>"``)."""
        return {f"{m}.{k}": v for m, head in self.heads.items() for k, v in head.state_dict().items()}

    def save_pretrained(self, directory: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None,
                        repo_id: str | None = None) -> Path:
        """Write the model folder: ``config.json``, ``heads.safetensors`` and a model card.

        Args:
            directory: the folder (created if needed).
            run_dir: a folder with the training record (a run folder, or a model
                folder saved with one): its ``recipe.yaml``, ``metrics.json`` and
                ``umap*.png`` are copied and go into the card. Default: the folder
                this model was loaded from, if any.
            repo_id: the Hub repo the card's usage example loads from.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = Path(run_dir) if run_dir is not None else self.record_dir
        if record is not None:
            copy_record(record, directory)
        config = self.folder_config()
        write_config(directory, config)
        save_heads(directory, self.head_state())
        write_model_card(directory, config, repo_id=repo_id)
        return directory

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike[str], device: str | None = None, *,
                        revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                        token: str | bool | None = None, local_files_only: bool = False,
                        adapter_options: Mapping[str, Mapping[str, Any]] | None = None) -> CoEmbedder:
        """Load a model from a model folder, a run folder (its ``model/``) or a Hub repo id.

        A Hub repo is downloaded (only its config, heads, card, record and
        figures) into the Hugging Face cache, then loaded exactly like a local
        folder. ``HF_HUB_OFFLINE=1`` uses the cache only.

        Args:
            model_id: a local folder, or a Hub repo id such as ``"user/vggish-to-clip"``.
            device: where heads and encoders run (``"cpu"``, ``"cuda"``, ...);
                default: CUDA when available.
            revision, cache_dir, token, local_files_only: passed to the Hub
                download; unused for local folders.
            adapter_options: options of a modality's encoder that replace the
                saved ones on this machine, e.g. ``{"audio": {"weights":
                "/data/vggish.pth"}}`` for a model trained with a weights file
                that lies elsewhere here. Local weights are compared by
                content: a copy of the training weights is accepted, other
                weights are refused. Not saved with the model.

        Raises:
            ModelLoadError: missing or malformed files, a newer format, head
                weights that do not match the config, or ``adapter_options``
                for a modality the model does not have.
        """
        model_dir, record_dir = locate_model(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                                 local_files_only=local_files_only)
        model = cls._from_folder(model_dir, device, adapter_options or {})
        model.record_dir = record_dir
        return model

    @classmethod
    def _from_folder(cls, directory: Path, device: str | None,
                     adapter_options: Mapping[str, Mapping[str, Any]]) -> CoEmbedder:
        config = read_config(directory / layout.MODEL_CONFIG)
        try:
            model = cls(config.anchor, config.modalities, config.output_dim, config.metadata)
        except ValueError as exc:  # a head config that cannot map input_dim to output_dim
            raise ModelLoadError(f"{directory / layout.MODEL_CONFIG}: {exc}") from None
        unknown = sorted(set(adapter_options) - set(model.specs))
        if unknown:
            raise ModelLoadError(f"adapter_options name modalities this model does not have: {', '.join(unknown)}; "
                                 f"it has: {', '.join(model.specs)}")
        model._load_heads(directory / layout.MODEL_WEIGHTS)
        model._device = device
        model._adapter_overrides = {m: dict(options) for m, options in adapter_options.items()}
        model.heads.to(resolve_device(device or "auto"))
        return model

    def _load_heads(self, path: Path) -> None:
        state = load_heads(path, self.head_state())
        for m, head in self.heads.items():
            head.load_state_dict({k: state[f"{m}.{k}"] for k in head.state_dict()}, strict=True)

    def push_to_hub(self, repo_id: str, *, run_dir: str | os.PathLike[str] | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None) -> str:
        """Upload this model to the Hub repo ``repo_id`` (created if needed); returns the repo URL.

        The folder :meth:`save_pretrained` writes (config, heads, model card and,
        with ``run_dir`` or when loaded from a folder with one, the training
        record and figures) is built in a temporary folder and uploaded in one commit.
        """
        with tempfile.TemporaryDirectory(prefix="coembed-push-") as tmp:
            self.save_pretrained(tmp, run_dir=run_dir, repo_id=repo_id)
            return upload_folder(Path(tmp), repo_id, private=private, token=token,
                                     commit_message=commit_message)


def _item_list(raw: Any) -> list[Any]:
    """A list (or a tuple that is not an ``(array, rate)`` pair) is many items; anything else is one."""
    if isinstance(raw, list):
        return raw
    if isinstance(raw, tuple) and not _is_rated_array(raw):
        return list(raw)
    return [raw]


def _is_rated_array(item: Any) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (np.ndarray, torch.Tensor))
            and isinstance(item[1], (int, np.integer)) and not isinstance(item[1], bool))


def _audio_item(item: Any, sample_rate: int | None, index: int) -> Any:
    """Arrays (bare or with their rate) become :class:`~coembed.media.Waveform`; other items pass through."""
    if _is_rated_array(item):
        array, rate = item
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        if sample_rate is None:
            raise ValueError(f"audio item {index} is an array without a sample rate: "
                             "pass sample_rate=... or an (array, sample_rate) pair")
        array, rate = item, sample_rate
    else:
        return item
    samples = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
        samples = samples.T  # [channels, samples] (torchaudio, librosa) -> [samples, channels]
    return Waveform(samples, int(rate))
