"""The recipe's schema: pydantic models of every section, ``--set`` overrides, reading the YAML.

A recipe names a data source, one adapter (frozen encoder) and one head per
modality, the anchor modality whose space everything is projected into, the
pair types to train on, and the extraction, training and evaluation settings.
Every key is checked here by its type and range: an unknown key or a bad value
fails with a message naming the key and what is allowed. What needs more than
the schema (an adapter's or a source's own options, the validation metric
names) is checked by :mod:`coembed.recipe`, which builds on this module.

This module imports no torch and nothing of coembed but :mod:`coembed.errors`,
so anything may read a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coembed.errors import RecipeError, validation_problems

#: Images above this many pixels are refused (decompression bombs); ``data.max_image_pixels`` changes it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default warning threshold

#: Audio quieter than this (RMS, dBFS) counts as silent; ``data.silence_db`` changes it.
DEFAULT_SILENCE_DB = -60.0

#: What an audio adapter does with a clip shorter than its encoder's window (the option ``short_audio``):
#: ``pad`` it with silence, ``repeat`` it until it fills the window, or ``refuse`` it (a bad item).
ShortAudio = Literal["pad", "repeat", "refuse"]
DEFAULT_SHORT_AUDIO: ShortAudio = "pad"

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadConfig(_Strict):
    """A projection head into the anchor space.

    ``asif`` heads are not trained: ``train.method: asif`` builds them (the
    anchor pairs they compare with are part of their weights).
    """

    type: Literal["identity", "linear", "mlp", "asif"] = "linear"
    hidden_dim: int | None = Field(default=None, gt=0, description="MLP hidden width (default: 2x output)")
    num_layers: int = Field(default=2, ge=2, description="MLP linear layers (with residual: the input and output "
                                                         "layers around num_layers - 1 residual blocks)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True
    identity_init: bool = Field(
        default=False, description="linear head starts as the identity (needs equal in/out dims)")
    norm: Literal["layernorm", "none"] = Field(
        default="layernorm", description="MLP: LayerNorm of the input (and inside residual blocks), or none")
    residual: bool = Field(
        default=False, description="MLP: hidden layers are pre-LayerNorm residual blocks "
                                   "x + Linear(Dropout(GELU(Linear(LN(x))))) (FuseMix)")
    top_k: int = Field(default=32, gt=0, description="asif: similarities to the anchor items kept per item")
    power: float = Field(default=8.0, gt=0.0, description="asif: exponent sharpening the kept similarities")


def resolve_key(modality: str, adapter: str) -> str:
    """An adapter's registry key: ``("audio", "vggish")`` or ``("audio", "audio/vggish")`` -> ``"audio/vggish"``."""
    return adapter if "/" in adapter else f"{modality}/{adapter}"


class ModalityConfig(BaseModel):
    """One modality: its adapter, the adapter's own options, and its head.

    Keys other than ``adapter``, ``head`` and ``column`` are the adapter's
    options and are validated against the adapter's declared options.
    """

    model_config = ConfigDict(extra="allow")

    adapter: str
    head: HeadConfig = Field(default_factory=HeadConfig)
    column: str | None = Field(default=None, description="data column holding this modality (default: its name)")

    @property
    def adapter_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SplitConfig(_Strict):
    validation: float = Field(default=0.33, ge=0.0, lt=1.0, description="share of groups held out")


class DataConfig(BaseModel):
    """The data source. ``source`` picks the reader; the rest are its options."""

    model_config = ConfigDict(extra="allow")

    source: str = "manifest"
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_bad_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fail the run when more than this share of one modality's items, or of one pair type's "
                    "candidate pairs, is bad")
    silent_audio: Literal["keep", "drop"] = Field(
        default="keep", description="silent audio is always flagged in bad_items.jsonl; keep it or skip it")
    silence_db: float = Field(default=DEFAULT_SILENCE_DB, lt=0.0,
                              description="audio below this RMS level (dBFS) is silent")
    max_image_pixels: int | None = Field(default=DEFAULT_MAX_IMAGE_PIXELS, gt=0,
                                         description="images above this many pixels are skipped (null: no limit)")

    #: keys of this section that belong to coembed, not to the source
    COMMON_KEYS: ClassVar[tuple[str, ...]] = ("split", "max_bad_fraction", "silent_audio", "silence_db",
                                              "max_image_pixels")

    @property
    def source_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RayConfig(_Strict):
    """How the Ray engine (``extraction.engine: ray``) spreads extraction over a Ray cluster (see docs/scale.md)."""

    address: str | None = Field(
        default=None, description="the Ray cluster to join ('auto', 'ray://head:10001'); null: start a local Ray "
                                  "on this machine's CPUs and GPUs")
    decode_batch_size: int = Field(default=32, gt=0, description="items each decoding task loads at once")
    decode_cpus: float = Field(default=1.0, gt=0.0, description="CPUs each decoding task reserves")
    encoders: int = Field(default=1, gt=0, description="encoder actors (each loads the model once)")
    encode_batch_size: int | None = Field(
        default=None, gt=0, description="items per encoder call (default: extraction.batch_size)")
    encoder_cpus: float = Field(default=1.0, gt=0.0, description="CPUs each encoder actor reserves")
    encoder_gpus: float | None = Field(
        default=None, ge=0.0, description="GPUs each encoder actor reserves (default: 1 when the cluster has GPUs, "
                                          "else 0; a fraction shares a GPU between actors)")
    max_retries: int | None = Field(
        default=None, ge=0, description="times a decoding task or an encoder actor whose process died is retried "
                                        "(restarted) before the run fails (null: Ray Data's default, without "
                                        "limit)")


class ExtractionConfig(_Strict):
    engine: Literal["local", "ray"] = Field(
        default="local", description="local: DataLoader workers on this machine; ray: Ray Data over a cluster "
                                     "(pip install 'coembed[ray]'), settings in extraction.ray")
    batch_size: int = Field(default=32, gt=0)
    num_workers: int = Field(default=2, ge=0, description="DataLoader workers of the local engine")
    shard_size: int = Field(default=4096, gt=0, description="items per store shard (resume granularity)")
    cache_dir: str | None = Field(default=None, description="embedding store root: a folder, or a URI pyarrow opens "
                                                            "(file://, s3://, ...) (default: "
                                                            "~/.cache/coembed/embeddings)")
    ray: RayConfig = Field(default_factory=RayConfig)


class TemperatureConfig(_Strict):
    init: float = Field(default=0.07, gt=0.0)
    learnable: bool = True
    min: float = Field(default=0.01, gt=0.0)


class SigmoidLossConfig(_Strict):
    """The SigLIP pairwise loss's learnable bias (its scale is ``train.temperature``)."""

    bias_init: float = Field(default=-10.0, description="initial logit bias (SigLIP: -10)")
    learnable_bias: bool = Field(default=True, description="train the bias, or keep it at bias_init")


class AlignmentConfig(_Strict):
    """Options of the closed-form and training-free methods (``train.method`` other than ``contrastive``)."""

    ridge_alphas: list[Annotated[float, Field(gt=0.0)]] = Field(
        default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], min_length=1,
        description="ridge: penalties tried, relative to the mean eigenvalue of the input covariance; "
                    "the one with the best select_metric on validation is kept")
    cca_dims: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="cca: canonical dimensions tried (default: powers of two up to the smaller dim "
                                  "and that dim); the best on validation is kept")
    cca_regularization: float = Field(
        default=1e-3, ge=0.0, description="cca: ridge added to both covariances, relative to their mean eigenvalue")
    asif_anchors: int = Field(default=4096, gt=1, description="asif: training pairs kept as anchor pairs "
                                                                "(drawn by the seed; all when fewer)")
    asif_top_k: list[Annotated[int, Field(gt=0)]] = Field(
        default=[8, 32, 128], min_length=1, description="asif: similarities kept per item, tried on validation")
    asif_power: list[Annotated[float, Field(gt=0.0)]] = Field(
        default=[1.0, 4.0, 8.0], min_length=1, description="asif: sharpening exponents, tried on validation")


class TrainConfig(_Strict):
    method: Literal["contrastive", "ridge", "procrustes", "cca", "asif"] = Field(
        default="contrastive", description="how the maps into the anchor space are fitted: contrastive training "
                                           "of the heads, or a closed-form / training-free baseline "
                                           "(see docs/guide.md)")
    epochs: int = Field(default=300, gt=0)
    batch_size: int = Field(default=4096, gt=1, description="pairs per contrastive batch; under torchrun the global "
                                                           "batch, spread over the processes (docs/scale.md)")
    lr: float = Field(default=1e-4, gt=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0.0)
    temperature: TemperatureConfig = Field(default_factory=TemperatureConfig)
    device: str = "auto"
    select_metric: str = Field(default="mean_r1", description="validation metric that picks the best checkpoint")
    patience: int | None = Field(default=None, gt=0, description="stop after this many epochs without improvement")
    validation_sample: int | None = Field(
        default=5000, gt=1, description="validation pairs each validation ranks for model selection, drawn by group "
                                        "from the seed (null: all); the final metrics rank every one, once")
    validate_every: int = Field(default=1, gt=0, description="validate every N epochs (and after the last)")
    autocast: bool | None = Field(default=None, description="bf16 autocast of the heads, loss and temperature in "
                                                            "float32 (default: on with CUDA, off elsewhere)")
    loss: Literal["infonce", "sigmoid"] = Field(
        default="infonce", description="symmetric InfoNCE, or the pairwise sigmoid loss of SigLIP")
    sigmoid: SigmoidLossConfig = Field(default_factory=SigmoidLossConfig)
    mixup: float = Field(default=0.0, ge=0.0, description="latent mixup (FuseMix): a in lambda ~ Beta(a, a), one "
                                                          "lambda per step for every modality, mixing the two halves "
                                                          "of each batch (0: off)")
    label_positives: bool = Field(
        default=False, description="items of the same class (records' labels) are not negatives of each other")
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="learning rate after the warmup: constant, or cosine decay to 0 at the "
                                        "last step of train.epochs")
    warmup_steps: int = Field(default=0, ge=0, description="steps of linear learning-rate warmup from 0")
    warmup_fraction: float = Field(default=0.0, ge=0.0, lt=1.0,
                                   description="warmup as a share of all steps (instead of warmup_steps)")
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainConfig":
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("give train.warmup_steps or train.warmup_fraction, not both")
        return self


class ZeroShotConfig(_Strict):
    """One zero-shot classification set: labelled items of one modality against class-name prompts."""

    name: str | None = Field(default=None, description="name of the results (default: the data source's name)")
    modality: str = Field(default="audio", description="the modality whose items are classified")
    text_modality: str | None = Field(
        default=None, description="the text side (default: the modality 'text', else the only one taking text)")
    templates: str | list[str] | None = Field(
        default=None, description="prompt templates with '{}' for the class name, or a built-in set's name "
                                  "(default: the set for the modality)")
    column: str | None = Field(default=None, description="data column holding the items (default: the modality)")
    data: DataConfig = Field(description="where the labelled items come from: a data source and its options")


class EvalConfig(_Strict):
    """What ``coembed train`` evaluates and draws after training (see docs/evaluation.md)."""

    plots: bool = Field(default=True, description="draw the UMAP figures and the training curve")
    report: bool = Field(default=True, description="write report.md into the run folder")
    figure_classes: Annotated[int, Field(gt=0)] | list[str] = Field(
        default=10, description="classes in the UMAP figures: how many of the most frequent, or their names")
    figure_items_per_class: int = Field(default=30, gt=0, description="validation items per class in the figures")
    figure_pairs: int = Field(default=20, gt=0, description="random training pairs in the pairs figure")
    umap_neighbors: int = Field(default=15, ge=2, description="UMAP n_neighbors (smaller for small sets)")
    zero_shot: list[ZeroShotConfig] = Field(default_factory=list, description="zero-shot classification sets")


class Recipe(_Strict):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    anchor: str
    modalities: dict[str, ModalityConfig]
    pairs: list[tuple[str, str]]
    data: DataConfig = Field(default_factory=DataConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    #: folder relative paths in the recipe resolve against (the working directory at load time)
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("modalities")
    @classmethod
    def _some_modalities(cls, v: dict[str, ModalityConfig]) -> dict[str, ModalityConfig]:
        if not v:
            raise ValueError("at least one modality is needed")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        names = set(self.modalities)
        if self.anchor not in names:
            raise ValueError(f"anchor {self.anchor!r} is not one of the modalities {sorted(names)}")
        if not self.pairs:
            raise ValueError("pairs: at least one pair type is needed, e.g. [[image, audio]]")
        for a, b in self.pairs:
            for m in (a, b):
                if m not in names:
                    raise ValueError(f"pairs: {m!r} is not one of the modalities {sorted(names)}")
            if a == b:
                raise ValueError(f"pairs: a pair type needs two different modalities, got [{a}, {b}]")
        for m, cfg in self.modalities.items():
            if cfg.head.type == "asif":
                raise ValueError(f"modalities.{m}.head.type: asif heads are built by train.method asif, "
                                 "not trained; use identity, linear or mlp")
        method = self.train.method
        if method != "contrastive":
            for a, b in self.pairs:
                if self.anchor not in (a, b):
                    raise ValueError(f"train.method {method}: every pair type must hold the anchor "
                                     f"{self.anchor!r}; [{a}, {b}] does not")
            if len({frozenset(p) for p in self.pairs}) != len(self.pairs):
                raise ValueError(f"train.method {method}: a pair type is given twice")
        if method in ("cca", "asif") and (len(self.pairs) != 1 or set(self.pairs[0]) != names):
            raise ValueError(f"train.method {method} maps the anchor too: it takes one pair type joining the "
                             f"anchor with the only other modality (got pairs {self.pairs} over modalities "
                             f"{sorted(names)})")
        return self

    def trained_modalities(self) -> list[str]:
        """The modalities some pair type joins, in the order of ``modalities``."""
        return sorted({m for pair in self.pairs for m in pair}, key=list(self.modalities).index)

    def adapter_keys(self) -> dict[str, str]:
        """modality -> the registry key of its adapter (``"audio/vggish"``)."""
        return {m: resolve_key(m, cfg.adapter) for m, cfg in self.modalities.items()}

    def resolve_path(self, value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.subkey=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"override {item!r} names no key")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a recipe file; :class:`RecipeError` when it is missing or not a YAML mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise RecipeError(f"{where}: not valid YAML: {what}" + (f"\n{mark.get_snippet()}" if mark else "")) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def parse_recipe(data: dict[str, Any], base_dir: str | Path = ".") -> Recipe:
    """A :class:`Recipe` from a raw mapping, checked against the schema alone (see :mod:`coembed.recipe`)."""
    try:
        return Recipe.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        raise RecipeError(validation_problems(exc)) from None
