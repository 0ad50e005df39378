"""Zero-shot classification: labelled items of one modality against class names read by the text side.

The protocol (``docs/evaluation.md`` has the long form):

1. Labelled items come from any data source: ``esc50`` (the ESC-50 folder
   layout, all folds or chosen ones), a ``manifest`` with a label column, the
   ``video_folder`` source (e.g. VGG-Sound's test split), ... They are encoded
   through the embedding store (cached; bad items are reported and skipped)
   and projected by the modality's head.
2. Each class name (underscores read as spaces) is put into every prompt
   template; the prompts are embedded by the text modality (its adapter and
   head), normalised, averaged per class and renormalised, as CLIP does.
3. Items rank the classes by cosine similarity with the pessimistic tie rule
   of :mod:`coembed.evaluation`: top-k accuracy is the share of items whose
   true class ranks ``<= k``. The predicted class (for the confusion matrix)
   is the true class when it ranks first, else the best other class, so the
   matrix's diagonal is exactly the top-1 accuracy.
4. Chance levels: top-k chance ``min(k, C) / C`` (a uniform guess over the
   ``C`` classes) and the majority share (always answering the most frequent
   class). The classes are the labels present in the evaluated items.

Nothing here depends on audio: any modality pair whose model has a text side
(a modality whose adapter takes text) works the same way.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from coembed.evaluation import chunk_slices, embed_records, encode_labels, model_recipe, rank_gallery, read_records

if TYPE_CHECKING:
    from coembed.model import CoEmbedder
    from coembed.recipe import ExtractionConfig, Recipe, ZeroShotConfig

log = logging.getLogger(__name__)

#: Built-in prompt template sets; ``{}`` stands for the class name. A model's
#: modality uses the set named after its adapter's kind (``audio`` for
#: ``audio/vggish``), else ``plain``.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "audio": (
        "a sound of a {}.",
        "the sound of {}.",
        "a recording of {}.",
        "this is the sound of {}.",
        "{} can be heard.",
    ),
    "image": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a photo of the {}.",
        "a drawing of a {}.",
        "a photo of many {}.",
    ),
}
TOP_K = 5


def resolve_templates(templates: str | Sequence[str] | None, kind: str) -> list[str]:
    """The prompt templates: a list as given, a built-in set by name, or the set for ``kind``."""
    if templates is None:
        return list(TEMPLATE_SETS.get(kind, TEMPLATE_SETS["plain"]))
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; built-in sets: {', '.join(TEMPLATE_SETS)} "
                             "(or give a list of templates with '{}')")
        return list(TEMPLATE_SETS[templates])
    out = list(templates)
    if not out:
        raise ValueError("templates: at least one template is needed")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must hold '{{}}' exactly once, where the class name goes")
    return out


def prompt_name(label: str) -> str:
    """How a class label reads in a prompt: ``"chirping_birds"`` -> ``"chirping birds"``."""
    return " ".join(label.replace("_", " ").split())


def text_side(kinds: dict[str, str], requested: str | None, classified: str) -> str:
    """The modality that reads the prompts: ``requested``, else ``text``, else the only text-taking one.

    ``kinds`` maps each modality to how its adapter takes input (``"text"`` or ``"file"``).
    """
    if requested is not None:
        if requested not in kinds:
            raise ValueError(f"text_modality {requested!r} is not one of the modalities {sorted(kinds)}")
        if kinds[requested] != "text":
            raise ValueError(f"text_modality {requested!r} does not take text")
        found = requested
    elif kinds.get("text") == "text":
        found = "text"
    else:
        texts = [m for m, k in kinds.items() if k == "text"]
        if len(texts) != 1:
            raise ValueError("zero-shot classification needs a text side, a modality whose adapter takes text "
                             f"(e.g. text/clip); {'none' if not texts else 'several: ' + ', '.join(texts)} found: "
                             "name it with text_modality")
        found = texts[0]
    if found == classified:
        raise ValueError(f"the classified modality {classified!r} cannot be its own text side")
    return found


def class_embeddings(model: "CoEmbedder", text_modality: str, classes: Sequence[str], templates: Sequence[str],
                     batch_size: int = 64) -> torch.Tensor:
    """``[C, dim]``: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.replace("{}", prompt_name(c)) for c in classes for t in templates]
    vectors = model.embed_items(text_modality, prompts, batch_size=batch_size)  # normalised rows
    per_class = vectors.reshape(len(classes), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def classify(items: torch.Tensor, class_vectors: torch.Tensor, targets: torch.Tensor,
             chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank of the true class, predicted class)`` per item (pessimistic ranks, see the module doc)."""
    n_classes = class_vectors.shape[0]
    ranks = rank_gallery(items, class_vectors, targets, torch.arange(n_classes), chunk_size).first_rank.cpu()
    predicted = targets.clone().cpu()
    q, g = F.normalize(items.float(), dim=-1), F.normalize(class_vectors.float().to(items.device), dim=-1)
    for sl in chunk_slices(items.shape[0], chunk_size):
        sims = (q[sl] @ g.T).cpu()
        sims[torch.arange(sims.shape[0]), targets[sl]] = float("-inf")
        best_other = sims.argmax(dim=1)
        predicted[sl] = torch.where(ranks[sl] == 1, targets[sl], best_other)
    return ranks, predicted


def accuracy_metrics(ranks: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor,
                     classes: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float]], list[list[int]]]:
    """Top-1/top-5 accuracy, mean per-class accuracy and chance levels; per-class rows; confusion matrix."""
    n_classes, n = len(classes), targets.numel()
    k = min(TOP_K, n_classes)
    counts = torch.bincount(targets, minlength=n_classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((targets, predicted), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        mine = targets == c
        if counts[c]:
            per_class[name] = {"n": int(counts[c]), "top1": float((ranks[mine] <= 1).float().mean()),
                               f"top{TOP_K}": float((ranks[mine] <= k).float().mean())}
    metrics = {
        "top1": float((ranks <= 1).float().mean()),
        f"top{TOP_K}": float((ranks <= k).float().mean()),
        "mean_per_class_top1": float(sum(v["top1"] for v in per_class.values()) / len(per_class)),
        "chance/top1": 1.0 / n_classes,
        f"chance/top{TOP_K}": k / n_classes,
        "majority/top1": float(counts.max()) / n,
        "items": float(n),
        "classes": float(n_classes),
    }
    return metrics, per_class, confusion.tolist()


@dataclass
class ZeroShotResult:
    """The outcome of one zero-shot set, with the protocol that produced it."""

    name: str
    modality: str
    text_modality: str
    classes: list[str]
    templates: list[str]
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    counts: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def json_name(self) -> str:
        return f"zeroshot-{self.name}.json"

    @property
    def figure_name(self) -> str:
        return f"zeroshot-{self.name}-confusion.png"

    def save(self, folder: Path) -> list[Path]:
        """Write ``zeroshot-<name>.json`` and the confusion-matrix figure into ``folder``."""
        from coembed.plots import plot_confusion

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.json_name
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        m = self.metrics
        title = (f"zero-shot {self.name}: {self.modality} vs {self.text_modality} prompts\n"
                 f"top-1 {m['top1']:.1%} (chance {m['chance/top1']:.1%}), {int(m['items'])} items")
        figure = plot_confusion(self.confusion, self.classes, title, folder / self.figure_name)
        return [path, figure]

    @classmethod
    def load(cls, path: Path) -> "ZeroShotResult":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def run_zero_shot(model: "CoEmbedder", config: "ZeroShotConfig", *, extraction: "ExtractionConfig | None" = None,
                  base_dir: str | Path = ".", out_dir: Path | None = None, progress: bool = True) -> ZeroShotResult:
    """Zero-shot classification of one labelled set with ``model``; saved into ``out_dir`` when given."""
    from coembed.data import check_bad_fraction, reason_kind
    from coembed.registry import get_adapter_class

    kinds = {m: get_adapter_class(s.adapter).raw_input for m, s in model.specs.items()}
    if config.modality not in kinds:
        raise ValueError(f"this model has no {config.modality!r} modality; it has: {', '.join(kinds)}")
    text = text_side(kinds, config.text_modality, config.modality)
    templates = resolve_templates(config.templates, model.specs[config.modality].kind)
    name = config.name or config.data.source
    recipe = model_recipe(model, config.data, [config.modality, text],
                          columns={config.modality: config.column} if config.column else None,
                          extraction=extraction, base_dir=base_dir)
    records, bad_records = read_records(recipe)
    held = [r for r in records if config.modality in r.items]
    labelled = [r for r in held if r.label is not None]
    log.info("zero-shot %s: %d %s items with labels (%d without, %d unreadable records)", name, len(labelled),
             config.modality, len(held) - len(labelled), len(bad_records))
    items = embed_records(model, recipe, config.modality, labelled, progress)
    bad = [{"id": b.id, "modality": b.modality, "reason": b.reason} for b in bad_records] + items.bad
    check_bad_fraction(len(bad), len(labelled) + len(bad_records), config.data.max_bad_fraction)
    if len(items.ids) == 0:
        raise ValueError(f"zero-shot {name}: no usable labelled {config.modality} items in {recipe.data.source} data")
    targets, classes = encode_labels([str(x) for x in items.labels])
    class_vectors = class_embeddings(model, text, classes, templates)
    ranks, predicted = classify(items.vectors, class_vectors, targets)
    metrics, per_class, confusion = accuracy_metrics(ranks, predicted, targets, classes)
    counts: dict[str, Any] = {"records": len(records), "labelled": len(labelled),
                              "unlabelled": len(held) - len(labelled), "items": len(items.ids), "bad_items": len(bad),
                              "bad_by_reason": dict(Counter(reason_kind(b["reason"]) for b in bad))}
    data = {"source": config.data.source, **config.data.source_options}
    result = ZeroShotResult(name, config.modality, text, classes, templates, metrics, per_class, confusion,
                            counts, data)
    log.info("zero-shot %s: top-1 %.4f (chance %.4f), top-%d %.4f over %d items, %d classes", name,
             metrics["top1"], metrics["chance/top1"], TOP_K, metrics[f"top{TOP_K}"], len(items.ids), len(classes))
    if out_dir is not None:
        result.save(out_dir)
    return result


def validate_zero_shot(recipe: "Recipe") -> None:
    """Check every ``eval.zero_shot`` entry: modalities, text side, templates, unique names, source options."""
    from coembed.data import modality_kinds, validate_source_options
    from coembed.recipe import RecipeError
    from coembed.registry import AdapterError, resolve_key

    if not recipe.eval.zero_shot:
        return
    problems: list[str] = []
    seen: set[str] = set()
    try:
        kinds: dict[str, str] | None = modality_kinds(recipe)
    except AdapterError:
        kinds = None  # an unknown adapter is reported by validate_adapters
    for i, zs in enumerate(recipe.eval.zero_shot):
        where = f"eval.zero_shot.{i}"
        name = zs.name or zs.data.source
        if name in seen:
            problems.append(f"  {where}.name: {name!r} is used twice; give each zero-shot set its own name")
        seen.add(name)
        if zs.modality not in recipe.modalities:
            problems.append(f"  {where}.modality: {zs.modality!r} is not one of the modalities "
                            f"{sorted(recipe.modalities)}")
            continue
        try:
            if kinds is not None:
                text_side(kinds, zs.text_modality, zs.modality)
            kind = resolve_key(zs.modality, recipe.modalities[zs.modality].adapter).partition("/")[0]
            resolve_templates(zs.templates, kind)
        except ValueError as exc:
            problems.append(f"  {where}: {exc}")
        try:
            validate_source_options(recipe.model_copy(update={"data": zs.data}))
        except RecipeError as exc:
            lines = str(exc).splitlines()[1:]  # drop "invalid recipe:"
            problems += [line.replace("  data", f"  {where}.data", 1) for line in lines]
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(problems))


def run_recipe_zero_shot(recipe: "Recipe", model: "CoEmbedder", run_dir: Path,
                         progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every ``eval.zero_shot`` set of a recipe, results saved into the run folder.

    Returns the metrics by set name. A set that cannot be evaluated (missing
    data, too many bad items) is logged as an error and recorded as
    ``{"error": ...}``: the trained run stays complete.
    """
    from coembed.data import TooManyBadItems
    from coembed.recipe import RecipeError
    from coembed.registry import AdapterError

    out: dict[str, dict[str, Any]] = {}
    for config in recipe.eval.zero_shot:
        name = config.name or config.data.source
        try:
            result = run_zero_shot(model, config, extraction=recipe.extraction, base_dir=recipe.base_dir,
                                   out_dir=run_dir, progress=progress)
        except (RecipeError, AdapterError, TooManyBadItems, ValueError, OSError) as exc:
            log.error("zero-shot %s failed: %s", name, exc)
            out[name] = {"error": str(exc)}
            continue
        out[name] = result.metrics
    return out
