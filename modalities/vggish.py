"""VGGish audio embeddings (``torchvggish``), one 128-d vector per clip.

Audio is decoded to 16 kHz mono by :func:`coembed.media.load_audio`, cut into
log-mel examples of 0.96 s by torchvggish's ``waveform_to_examples`` and run
through the VGGish network; a clip's vector is the mean over its examples. A
clip shorter than one example (:data:`MIN_SAMPLES`, 0.975 s) is padded with
silence, repeated or refused, as ``short_audio`` says.

The network is built from torchvggish's architecture without letting it
download anything; the weights (and, for ``postprocess``, the PCA parameters)
are looked up in the local cache or downloaded here, and loaded with
``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file
from torch import nn
from torchvggish import vggish_input, vggish_params
from torchvggish.torchvggish import PCA_PARAMS, VGG, VGGISH_WEIGHTS, make_layers

from coembed.layout import weights_path
from coembed.media import fit_audio, load_audio
from coembed.registry import Adapter, AdapterOptions, AudioOptions, WeightsUnavailable
from coembed_modalities._weights import describe_error, download_blocker, none_if_none_string, path_identity

SAMPLE_RATE: int = vggish_params.SAMPLE_RATE
#: Samples one example needs: a full 96-frame log-mel patch (25 ms windows, 10 ms hop), 0.975 s at 16 kHz.
MIN_SAMPLES: int = round(SAMPLE_RATE * vggish_params.STFT_WINDOW_LENGTH_SECONDS) + (
    vggish_params.NUM_FRAMES - 1) * round(SAMPLE_RATE * vggish_params.STFT_HOP_LENGTH_SECONDS)
#: Examples run through the network at once; bounds memory for long clips and large batches.
EXAMPLES_PER_FORWARD = 256


class VGGishOptions(AudioOptions):
    """Options of ``audio/vggish``."""

    weights: str | None = "release"
    """``release``: torchvggish's released weights (downloaded once to ``cache_dir``);
    a path: a local state dict (``.pth`` or ``.safetensors``);
    ``None``/``"none"``: random init (tests)."""

    postprocess: bool = False
    """Apply VGGish's PCA whitening and 8-bit quantisation to each example's
    embedding (as in the AudioSet release) before averaging. Needs ``weights``."""

    pca_params: str | None = None
    """Local file of the PCA parameters for ``postprocess`` (torchvggish's ``.pth``
    or the original ``vggish_pca_params.npz``); default: torchvggish's release."""

    cache_dir: str | None = None
    """Where released files are cached; default: torch hub's ``checkpoints`` folder."""

    sample_rate: int | None = Field(default=None, gt=0)
    """Sample rate of bare numpy/torch arrays given as items (other inputs carry their own)."""

    @field_validator("weights", "pca_params", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        return none_if_none_string(value)

    @model_validator(mode="after")
    def _postprocess_needs_weights(self) -> VGGishOptions:
        if self.postprocess and self.weights is None:
            raise ValueError("postprocess=True needs trained weights: VGGish's PCA parameters belong to the "
                             "released weights and mean nothing for a randomly initialised network; "
                             "set weights (e.g. 'release') or postprocess=False")
        return self


class AudioExamples(NamedTuple):
    """A collated batch: every clip's log-mel examples, concatenated, and how many each clip has."""

    examples: torch.Tensor
    """``[total_examples, 1, 96, 64]`` float32."""
    counts: torch.Tensor
    """``[batch]`` int64, examples per clip, in order."""


class PCAQuantizer(nn.Module):
    """VGGish's postprocessing: PCA whitening, clipping and 8-bit quantisation.

    The same computation as ``torchvggish.Postprocessor.postprocess``, kept on
    the model's device and without squeezing a batch of one.
    """

    eigen_vectors: torch.Tensor
    means: torch.Tensor

    def __init__(self, eigen_vectors: torch.Tensor, means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("eigen_vectors", eigen_vectors.float())
        self.register_buffer("means", means.float().reshape(-1, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        lo, hi = vggish_params.QUANTIZE_MIN_VAL, vggish_params.QUANTIZE_MAX_VAL
        whitened = torch.mm(self.eigen_vectors, embeddings.T - self.means).T
        return torch.round((whitened.clamp(lo, hi) - lo) * (255.0 / (hi - lo)))


class VGGishEncoder(nn.Module):
    """torchvggish's VGG network, optionally followed by :class:`PCAQuantizer`."""

    def __init__(self, vgg: VGG, postprocessor: PCAQuantizer | None = None) -> None:
        super().__init__()
        self.vgg = vgg
        self.postprocessor = postprocessor

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """``[n, 1, 96, 64]`` log-mel examples -> ``[n, 128]`` embeddings."""
        embeddings = self.vgg(examples)
        return embeddings if self.postprocessor is None else self.postprocessor(embeddings)


def _load_state(path: str) -> dict[str, Any]:
    """A state dict from ``.safetensors``, ``.npz`` or a ``torch.save`` file, never unpickling code."""
    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k]) for k in data.files}
    # torchvggish's PCA file holds numpy arrays: allow numpy's array reconstruction, nothing else.
    reconstruct = np.zeros(1).__reduce__()[0]
    numpy_globals: list[Any] = [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # the name in files written by numpy 1.x
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float32)),
        type(np.dtype(np.float64)),
    ]
    with torch.serialization.safe_globals(numpy_globals):
        return torch.load(path, map_location="cpu", weights_only=True)


class VGGishAdapter(Adapter):
    """Audio clips -> mean VGGish embedding over their 0.96 s examples (128-d)."""

    modality = "audio"
    name = "vggish"
    Options: ClassVar[type[AdapterOptions]] = VGGishOptions
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "cache_dir", "sample_rate"})
    weights_options: ClassVar[frozenset[str]] = frozenset({"weights", "pca_params"})
    #: Before ``short_audio`` existed, a clip shorter than one example was refused.
    added_options: ClassVar[Mapping[str, Any]] = {"short_audio": "refuse"}
    options: VGGishOptions

    @property
    def dim(self) -> int:
        return vggish_params.EMBEDDING_SIZE

    def config(self) -> dict[str, Any]:
        """As :meth:`Adapter.config`, without ``pca_params`` when ``postprocess`` is off (it changes nothing)."""
        config = super().config()
        if not self.options.postprocess:
            config.pop("pca_params")
        return config

    def weights_location(self, option: str) -> Path | None:
        """``weights`` or ``pca_params`` as a local file; ``release`` and ``None`` (random
        init, or the released PCA parameters) are not one."""
        return weights_path(getattr(self.options, option), is_name=lambda value: value == "release", hub_ids=False)

    def weights_identity(self) -> str:
        if self.options.weights is None:
            return "random-init"
        parts = [self._identity("weights", VGGISH_WEIGHTS)]
        if self.options.postprocess:
            parts.append("pca " + self._identity("pca_params", PCA_PARAMS))
        return ", ".join(parts)

    def _identity(self, option: str, release_url: str) -> str:
        location = self.weights_location(option)
        if location is None:
            return f"torchvggish release {os.path.basename(release_url)}"
        return path_identity(location)

    # -- model ----------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        opts = self.options
        # Find the files before building anything, so missing ones fail at once.
        weights_path = None if opts.weights is None else self._local_file("weights", VGGISH_WEIGHTS)
        pca_path = self._local_file("pca_params", PCA_PARAMS) if opts.postprocess else None
        vgg = VGG(make_layers(), postprocess=False)
        if weights_path is not None:
            try:
                vgg.load_state_dict(_load_state(weights_path))
            except Exception as exc:
                raise WeightsUnavailable(f"VGGish weights {weights_path} could not be loaded "
                                         f"({describe_error(exc)})") from exc
        postprocessor = None
        if pca_path is not None:
            try:
                params = _load_state(pca_path)
                postprocessor = PCAQuantizer(torch.as_tensor(params[vggish_params.PCA_EIGEN_VECTORS_NAME]),
                                             torch.as_tensor(params[vggish_params.PCA_MEANS_NAME]))
            except Exception as exc:
                raise WeightsUnavailable(f"VGGish PCA parameters {pca_path} could not be loaded "
                                         f"({describe_error(exc)})") from exc
        return VGGishEncoder(vgg, postprocessor)

    def _local_file(self, option: str, release_url: str) -> str:
        """Path of the file ``option`` names: a local file, or the release file from the cache or downloaded."""
        local_hint = (f"To use a local copy, download {release_url} elsewhere and point at it: "
                      f"--set modalities.audio.{option}=/path/{os.path.basename(release_url)}")
        location = self.weights_location(option)
        if location is not None:
            if not location.is_file():
                raise WeightsUnavailable(f"VGGish {option} file {getattr(self.options, option)!r} does not exist. "
                                         f"{local_hint}.")
            return str(location)
        folder = Path(self.options.cache_dir or Path(torch.hub.get_dir()) / "checkpoints").expanduser()
        target = folder / os.path.basename(release_url)
        if target.is_file():
            return str(target)
        what = f"VGGish released {'weights' if option == 'weights' else 'PCA parameters'} ({release_url})"
        blocker = download_blocker(release_url)
        if blocker:
            raise WeightsUnavailable(f"{what} are not available: {blocker}. {local_hint}, "
                                     f"or place the file in {folder}.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(release_url, str(target))
        except Exception as exc:
            raise WeightsUnavailable(f"{what} could not be downloaded ({describe_error(exc)}). "
                                     f"{local_hint}, or place the file in {folder}.") from exc
        return str(target)

    # -- data -----------------------------------------------------------------------
    def load(self, item: Any) -> torch.Tensor:
        """Decode ``item`` (path, bytes, Waveform, ``{"array", "sampling_rate"}``, array, or
        ``(array, rate)``) to 16 kHz mono and cut it into ``[n, 1, 96, 64]`` log-mel examples
        (a clip shorter than one example first fitted to it, as ``short_audio`` says)."""
        rate = self.options.sample_rate
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, np.integer)):
            item, rate = item
        wave = fit_audio(load_audio(item, SAMPLE_RATE, item_sample_rate=rate), MIN_SAMPLES,
                         self.options.short_audio, "VGGish")
        examples = vggish_input.waveform_to_examples(wave.samples, SAMPLE_RATE, return_tensor=False)
        return torch.from_numpy(examples.astype(np.float32))[:, None]

    def collate(self, items: Sequence[torch.Tensor]) -> AudioExamples:
        """Concatenate the clips' examples and keep how many each clip has."""
        return AudioExamples(torch.cat(list(items)), torch.tensor([len(x) for x in items], dtype=torch.long))

    def _encode(self, batch: AudioExamples) -> torch.Tensor:
        examples = batch.examples.to(self.device)
        embeddings = torch.cat([self.model(chunk) for chunk in examples.split(EXAMPLES_PER_FORWARD)])
        counts = batch.counts.to(self.device)
        clip_of_example = torch.repeat_interleave(torch.arange(len(counts), device=self.device), counts)
        sums = embeddings.new_zeros(len(counts), embeddings.shape[1]).index_add_(0, clip_of_example, embeddings)
        return sums / counts.unsqueeze(1).to(sums.dtype)
