"""Modality adapters (the API a plugin implements) and the registry that finds them.

An adapter turns raw input of one modality (a path, bytes, an array, a string)
into a fixed-size vector with a frozen pretrained encoder. Adapters are found
through the entry-point group ``coembed.modalities`` (:mod:`coembed.plugins`);
the built-in ones in ``coembed_modalities`` register through that same group,
so a third-party package adds a modality exactly the way coembed adds its own::

    [project.entry-points."coembed.modalities"]
    "audio/my-encoder" = "my_package.adapter:MyAudioAdapter"

The entry-point name is ``"<modality>/<name>"`` and must match the class's
``modality`` and ``name`` attributes.

A plugin needs only this module: :class:`Adapter`, :class:`AdapterOptions`
(:class:`AudioOptions` for audio, with ``short_audio``), and the exceptions it
raises, :class:`BadItem` and :class:`WeightsUnavailable` (defined in
:mod:`coembed.errors`, importable from here).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from coembed.config import DEFAULT_SHORT_AUDIO, ShortAudio, resolve_key
from coembed.devices import resolve_device
from coembed.errors import AdapterError, BadItem, WeightsUnavailable
from coembed.layout import weights_path
from coembed.plugins import PluginGroup

__all__ = ["Adapter", "AdapterError", "AdapterInfo", "AdapterOptions", "AudioOptions", "BadItem", "SampleItems",
           "WeightsUnavailable", "available_adapters", "create_adapter", "describe_adapters", "get_adapter_class", "input_kinds",
           "resolve_key"]

ENTRY_POINT_GROUP = "coembed.modalities"


class AdapterOptions(BaseModel):
    """Options of an adapter; each adapter subclasses this with its own keys.

    Unknown keys are an error, so a typo in a recipe fails before any work.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""


class AudioOptions(AdapterOptions):
    """Options every audio adapter has; an audio adapter's own options subclass this."""

    short_audio: ShortAudio = Field(
        default=DEFAULT_SHORT_AUDIO,
        description="a clip shorter than the encoder's window: 'pad' it with silence, 'repeat' it to fill the "
                    "window (both flagged in bad_items.jsonl, and kept), or 'refuse' it (a bad item)")
    """What happens to a clip shorter than the encoder's window; see
    :func:`coembed.media.fit_audio`. A clip under a few milliseconds is always a bad item."""


@dataclass(frozen=True)
class SampleItems:
    """Raw items an adapter must read (``good``, at least two, different from each other) and one it
    must refuse with :class:`BadItem` (``bad``)."""

    good: list[Any]
    bad: Any


class Adapter(ABC):
    """A frozen encoder for one modality.

    Subclasses set ``modality``, ``name`` and ``Options`` and implement
    :meth:`_load_model`, :meth:`load`, :meth:`encode` and :attr:`dim`.

    The model is loaded lazily, once, on first use of :attr:`model`. ``load``
    runs in DataLoader worker processes and must not need the model; ``encode``
    runs in the main process in eval mode with gradients off.
    """

    modality: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions

    #: How raw items arrive: ``"file"`` (paths, bytes, arrays; manifest paths are
    #: resolved against the manifest's folder) or ``"text"`` (strings, used as is).
    raw_input: ClassVar[str] = "file"

    #: Options that do not change the vectors and so stay out of the fingerprint.
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device"})

    #: Options whose value may be only where the weights lie on this machine (a file or
    #: folder path), weights that :meth:`weights_identity` then identifies by their content.
    #: Such an option holding a local path (:meth:`weights_location`) stays out of the
    #: fingerprint, so the same weights at another path give the same fingerprint; a value
    #: that names the weights (a tag, a Hub id) stays in.
    weights_options: ClassVar[frozenset[str]] = frozenset()

    #: Options added after the adapter's fingerprints were first recorded: option -> the value that
    #: does what the adapter did before it had the option. At that value the option stays out of the
    #: fingerprint (embedding stores and models written before keep theirs), and a saved model whose
    #: options lack it gets that value (:meth:`saved_options`).
    added_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, options: AdapterOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = options.model_copy(update=kwargs)
        self.options = options

    # -- identity -------------------------------------------------------------------
    @classmethod
    def key(cls) -> str:
        return f"{cls.modality}/{cls.name}"

    def config(self) -> dict[str, Any]:
        """JSON-serialisable options that recreate this adapter (runtime ones excluded)."""
        data = self.options.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in self.runtime_options}

    @property
    def fingerprint(self) -> str:
        """Cache key: adapter, model, weights and every output-changing option.

        Weights options holding a local path (:meth:`local_weights`) are left out:
        :meth:`weights_identity` stands for those weights, by content.
        """
        local = self.local_weights()
        config = {k: v for k, v in self.config().items()
                  if k not in local and not (k in self.added_options and v == self.added_options[k])}
        payload = json.dumps({"adapter": self.key(), "config": config, "weights": self.weights_identity()},
                             sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return f"{self.modality}-{self.name}-{digest}"

    @classmethod
    def saved_options(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The options of a saved :meth:`config` (a model folder's), with the earlier value of each of
        :attr:`added_options` that it lacks: the adapter it was saved from, fingerprint included."""
        return {**cls.added_options, **config}

    def weights_identity(self) -> str:
        """A string naming the weights. Override if needed.

        A tag or Hub id names its weights (add a revision if the library pins one);
        weights in a local file or folder must be named by their content (a digest
        of the bytes), never by their path: the fingerprint leaves the path of
        :attr:`weights_options` out and relies on this identity alone.
        """
        return ""

    def weights_location(self, option: str) -> Path | None:
        """The local file or folder that the weights option ``option`` names, or ``None``
        when its value names the weights some other way (a tag, a Hub id, random init).

        Decided from the value alone, whether the path exists here or not, by
        :func:`coembed.layout.weights_path`: a value written as a path, or one that
        cannot be a Hub repo id, is a path. Override (calling ``weights_path`` with
        the library's own names) where the library reads the value differently.
        """
        return weights_path(getattr(self.options, option))

    def local_weights(self) -> dict[str, Path]:
        """``{option: path}`` for each of :attr:`weights_options` in :meth:`config` that holds a local path."""
        config = self.config()
        return {option: path for option in sorted(self.weights_options & config.keys())
                if (path := self.weights_location(option)) is not None}

    @classmethod
    def sample_items(cls, folder: Path) -> SampleItems | None:
        """A few raw items of this adapter's modality and one bad item, for ``coembed modalities
        --check`` (:mod:`coembed.adapter_check`); files, if any, are written into ``folder``.

        ``None`` (the default): the check's own samples for ``audio``, ``image`` and ``text``. An
        adapter of another modality returns its own.
        """
        return None

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Output dimension and weights with default options, without loading the model if it can.

        An adapter whose dimension needs weights that are not here reports ``dim``
        as None and says why in ``note``.
        """
        adapter = cls()
        row: dict[str, Any] = {"weights": adapter.weights_identity() or "none"}
        try:
            row["dim"] = adapter.dim
        except WeightsUnavailable as exc:
            row["dim"] = None
            row["note"] = str(exc)
        return row

    @property
    def device(self) -> torch.device:
        return resolve_device(self.options.device)

    # -- model ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the adapter without its loaded model: ``load`` never needs it.
        state = self.__dict__.copy()
        state.pop("model", None)
        return state

    @cached_property
    def model(self) -> torch.nn.Module:
        model = self._load_model()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(self.device)

    @abstractmethod
    def _load_model(self) -> torch.nn.Module:
        """Build the encoder with its weights. Raise :class:`WeightsUnavailable` if they cannot load."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output dimension of :meth:`encode`."""

    # -- data -----------------------------------------------------------------------
    @abstractmethod
    def load(self, item: Any) -> Any:
        """Turn one raw item into the encoder's input for that item (CPU; no model).

        Raise :class:`BadItem` with a reason for an unusable item.
        """

    def collate(self, items: Sequence[Any]) -> Any:
        """Batch loaded items. Default: stack tensors."""
        return torch.stack([torch.as_tensor(x) for x in items])

    @abstractmethod
    def _encode(self, batch: Any) -> torch.Tensor:
        """Encode a collated batch into a ``[batch, dim]`` tensor (called under no_grad)."""

    def encode(self, batch: Any) -> torch.Tensor:
        """Encode a collated batch; float32 ``[batch, dim]`` on the CPU, not normalised."""
        with torch.inference_mode():
            out = self._encode(batch)
        return out.detach().float().cpu()

    def encode_items(self, items: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Convenience: ``load`` + ``collate`` + ``encode`` over raw items, in batches.

        An unusable item raises :class:`BadItem` whose message starts with its index (``"item 3: ..."``).
        """
        vectors, _, bad = self.encode_usable_items(items, batch_size, stop_at_bad=True)
        if bad:
            ((index, (reason, kind)),) = bad.items()
            raise kind(f"item {index}: {reason}")
        return vectors

    def encode_usable_items(self, items: Sequence[Any], batch_size: int = 32, stop_at_bad: bool = False,
                            ) -> tuple[torch.Tensor, list[int], dict[int, tuple[str, type[BadItem]]]]:
        """``load`` + ``collate`` + ``encode`` over the usable items: their vectors, their indexes in
        ``items``, and ``{index: (reason, BadItem class)}`` of the unusable ones (only the first with
        ``stop_at_bad``)."""
        outs: list[torch.Tensor] = []
        good: list[int] = []
        bad: dict[int, tuple[str, type[BadItem]]] = {}
        chunk: list[Any] = []
        for index, item in enumerate(items):
            try:
                chunk.append(self.load(item))
                good.append(index)
            except BadItem as exc:
                bad[index] = (str(exc), type(exc))
                if stop_at_bad:
                    break
            if len(chunk) == batch_size:
                outs.append(self.encode(self.collate(chunk)))
                chunk = []
        if chunk and not (stop_at_bad and bad):
            outs.append(self.encode(self.collate(chunk)))
        vectors = torch.cat(outs) if outs else torch.empty(0, self.dim)
        return vectors, good, bad

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


def _malformed_key(key: str) -> str | None:
    return None if "/" in key else "an adapter's entry-point name must be '<modality>/<name>'"


ADAPTERS: PluginGroup[Adapter] = PluginGroup(ENTRY_POINT_GROUP, Adapter, "adapter", AdapterError,
                                             declared_name=lambda cls: cls.key(), check_name=_malformed_key)


@dataclass(frozen=True)
class AdapterInfo:
    key: str
    modality: str
    name: str
    distribution: str


def available_adapters() -> dict[str, AdapterInfo]:
    """Every adapter registered in the ``coembed.modalities`` group, by ``modality/name``."""
    return {key: AdapterInfo(key, *key.split("/", 1), plugin.distribution)
            for key, plugin in ADAPTERS.available().items()}


def get_adapter_class(key: str) -> type[Adapter]:
    """The adapter class registered as ``key`` (``"modality/name"``)."""
    return ADAPTERS.load(key)


def input_kinds(adapters: dict[str, str]) -> dict[str, str]:
    """modality -> how its adapter takes raw items (``"file"`` or ``"text"``), for ``{modality: adapter key}``."""
    return {m: get_adapter_class(key).raw_input for m, key in adapters.items()}


def create_adapter(key: str, **options: Any) -> Adapter:
    """Instantiate the adapter ``key`` with validated options."""
    cls = get_adapter_class(key)
    return cls(cls.Options(**options))


def describe_adapters() -> list[dict[str, Any]]:
    """One row per registered adapter: key, modality, name, dim, weights, distribution, and ``error``
    for a plugin that fails to import, cannot be created or declares an unusable dim (never raised:
    one broken plugin leaves the others listed)."""
    rows = []
    for key, info in available_adapters().items():
        row: dict[str, Any] = {"key": key, "modality": info.modality, "name": info.name,
                               "distribution": info.distribution}
        try:
            cls = get_adapter_class(key)
            described = cls.describe()
        except AdapterError as exc:
            row["error"] = str(exc)
        except Exception as exc:  # a plugin whose constructor or dim raises: reported, the others listed
            row["error"] = (f"adapter {key!r} from distribution {info.distribution!r} cannot be described: "
                            f"{type(exc).__name__}: {exc}")
        else:
            dim = described.get("dim")
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
                row["error"] = (f"adapter {key!r} from distribution {info.distribution!r} declares dim {dim!r}: "
                                f"not a positive integer")
                described.pop("dim")
            row.update(described)
        rows.append(row)
    return rows
