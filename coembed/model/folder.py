"""The model folder format: ``config.json`` and ``heads.safetensors``, written and read strictly.

A saved model is a folder (file names in :mod:`coembed.layout`)::

    config.json          format version, coembed version, anchor, output dim, and per
                         modality: adapter key, adapter config (model, weights tag and every
                         other output-changing option), weights identity, encoder
                         fingerprint, input dim, head config
    heads.safetensors    the heads' weights and buffers (``<modality>.<param>``; an ASIF head's
                         anchor items too)
    README.md            the model card (:mod:`coembed.model.card`)
    recipe.yaml, metrics.json, umap*.png
                         the training record, when the model was saved with one

Loading is strict and safe: only ``config.json`` (JSON, validated key by key)
and ``heads.safetensors`` are read; nothing is unpickled and no code from the
folder runs. Every head weight must be present with its expected shape and no
other may be, and each head's input dimension and encoder fingerprint are
checked against the adapter that will feed it when that adapter is created.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coembed import layout
from coembed.config import HeadConfig
from coembed.errors import ModelLoadError, validation_problems
from coembed.registry import Adapter
from coembed.version import __version__

FORMAT_VERSION = 1
#: Modalities :meth:`~coembed.CoEmbedder.embed` names as keywords (and ``coembed encode`` as options);
#: others go by ``**inputs``.
NAMED_MODALITIES = ("image", "audio", "text")


class ModalitySpec(BaseModel):
    """How one modality reaches the shared space: one entry of ``config.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(description="adapter key, e.g. 'audio/vggish'")
    adapter_config: dict[str, Any] = Field(description="the adapter's options (runtime ones excluded)")
    weights: str = Field(description="the encoder's weights identity at training time")
    fingerprint: str = Field(description="the encoder fingerprint the head was trained on")
    input_dim: int = Field(gt=0)
    head: HeadConfig

    @property
    def kind(self) -> str:
        """The adapter's modality kind: ``"audio"`` for ``"audio/vggish"``."""
        return self.adapter.partition("/")[0]

    @classmethod
    def of(cls, adapter: Adapter, head: HeadConfig) -> ModalitySpec:
        """The spec of a head trained on ``adapter``'s vectors."""
        return cls(adapter=adapter.key(), adapter_config=adapter.config(), weights=adapter.weights_identity(),
                   fingerprint=adapter.fingerprint, input_dim=adapter.dim, head=head)


class ModelConfig(BaseModel):
    """The content of ``config.json``; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    coembed_version: str
    anchor: str
    #: the shared space's dimension: the anchor encoder's, unless the anchor has a head too (``cca``, ``asif``)
    output_dim: int = Field(gt=0)
    modalities: dict[str, ModalitySpec]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.anchor not in self.modalities:
            raise ValueError(f"anchor {self.anchor!r} is not one of the modalities {sorted(self.modalities)}")
        anchor = self.modalities[self.anchor]
        if anchor.head.type == "identity" and anchor.input_dim != self.output_dim:
            raise ValueError(f"the anchor's input_dim ({anchor.input_dim}) must equal output_dim "
                             f"({self.output_dim}) when its head is the identity")
        return self


def options_problem(exc: ValidationError) -> str:
    """A pydantic error of a model's config or an adapter's options, on one line."""
    return "; ".join(validation_problems(exc))


def read_config(path: Path) -> ModelConfig:
    """Read and validate ``config.json``; refuses a newer format and any malformed or unknown key."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: not a coembed model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelLoadError(f"{path} has no integer format_version: not a coembed model config")
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} was written by coembed {data.get('coembed_version', '?')} in model format {version}; "
            f"this coembed ({__version__}) reads format {FORMAT_VERSION} or older: upgrade coembed")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{path} is malformed: {options_problem(exc)}") from None


def write_config(folder: Path, config: ModelConfig) -> Path:
    path = folder / layout.MODEL_CONFIG
    path.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def save_heads(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """Write the heads' weights (``"<modality>.<param>"`` -> tensor) as safetensors."""
    path = folder / layout.MODEL_WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def load_heads(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads' weights of ``path``, checked against ``expected`` (the state the config implies):
    the same names, the same shapes, finite values."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match {layout.MODEL_CONFIG}: missing weights {missing or 'none'}, "
                             f"unexpected weights {unexpected or 'none'}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ModelLoadError(f"{path}: weight {key} has shape {tuple(state[key].shape)}, "
                                 f"{layout.MODEL_CONFIG} implies {tuple(value.shape)}")
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise ModelLoadError(f"{path}: weight {key} holds NaN or infinite values")
    return state


def check_local_weights(modality: str, spec: ModalitySpec, adapter: Adapter) -> None:
    """Refuse an encoder whose weights option names a local path that is not there, saying how to point
    it at a copy of the weights the head was trained on."""
    for option, path in adapter.local_weights().items():
        if not path.exists():
            raise ModelLoadError(
                f"{modality}: adapter {adapter.key()} option {option}={str(path)!r} names weights that do not exist "
                f"on this machine (the head was trained on weights {spec.weights}). Point it at a copy of those "
                f"weights: CoEmbedder.from_pretrained(..., adapter_options={{{modality!r}: {{{option!r}: "
                f"'/path/to/copy'}}}}), or on the command line --adapter-option {modality}.{option}=/path/to/copy")


def check_adapter_matches(modality: str, spec: ModalitySpec, adapter: Adapter) -> None:
    """Refuse to feed a head from an encoder other than the one it was trained on."""
    if adapter.dim != spec.input_dim:
        raise ModelLoadError(
            f"{modality}: the head expects {spec.input_dim}-dim input but adapter {adapter.key()} "
            f"gives {adapter.dim}-dim vectors")
    if adapter.fingerprint != spec.fingerprint:
        raise ModelLoadError(
            f"{modality}: the head was trained on encoder {spec.fingerprint} (weights: {spec.weights}) but "
            f"adapter {adapter.key()} with {adapter.config()} is encoder {adapter.fingerprint} "
            f"(weights: {adapter.weights_identity()})")


# ---------------------------------------------------------------------------------------
# the training record a model folder keeps
# ---------------------------------------------------------------------------------------


def record_files(folder: Path) -> list[Path]:
    """The training record in ``folder``: recipe, metrics and figures that exist there."""
    files = [folder / name for name in layout.RECORD_FILES if (folder / name).is_file()]
    return files + sorted(folder.glob(layout.FIGURE_GLOB))


def copy_record(source: Path, target: Path) -> None:
    """Copy the training record of ``source`` (a run or model folder) into the model folder ``target``."""
    for file in record_files(source):
        dest = target / file.name
        if not (dest.exists() and dest.samefile(file)):
            shutil.copyfile(file, dest)
