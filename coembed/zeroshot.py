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
   of :mod:`coembed.metrics`: top-k accuracy is the share of items whose
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coembed import layout
from coembed.bad_items import check_bad_fraction, count_reasons
from coembed.config import ExtractionConfig, ZeroShotConfig
from coembed.evaluation import EvaluationData, embed_records
from coembed.metrics import chunk_slices, encode_labels, rank_gallery
from coembed.model import CoEmbedder
from coembed.prompts import TOP_K, prompt_name, resolve_templates, text_side
from coembed.record import write_json
from coembed.registry import input_kinds

log = logging.getLogger(__name__)


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
        return layout.zero_shot_file(self.name)

    @property
    def figure_name(self) -> str:
        return layout.zero_shot_figure(self.name)

    @property
    def title(self) -> str:
        """A two-line caption: what was classified against what, and the top-1 accuracy."""
        m = self.metrics
        return (f"zero-shot {self.name}: {self.modality} vs {self.text_modality} prompts\n"
                f"top-1 {m['top1']:.1%} (chance {m['chance/top1']:.1%}), {int(m['items'])} items")

    def save(self, folder: Path) -> Path:
        """Write ``zeroshot-<name>.json`` into ``folder`` (the figure is drawn by :mod:`coembed.plots`)."""
        folder.mkdir(parents=True, exist_ok=True)
        return write_json(folder / self.json_name, asdict(self))

    @classmethod
    def load(cls, path: Path) -> ZeroShotResult:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def load_results(folder: Path) -> list[ZeroShotResult]:
    """Every zero-shot result saved in ``folder``, by name."""
    return [ZeroShotResult.load(p) for p in sorted(folder.glob(layout.ZERO_SHOT_GLOB))]


def run_zero_shot(model: CoEmbedder, config: ZeroShotConfig, *, extraction: ExtractionConfig | None = None,
                  base_dir: str | Path = ".", progress: bool = True) -> ZeroShotResult:
    """Zero-shot classification of one labelled set with ``model``."""
    kinds = input_kinds({m: s.adapter for m, s in model.specs.items()})
    if config.modality not in kinds:
        raise ValueError(f"this model has no {config.modality!r} modality; it has: {', '.join(kinds)}")
    text = text_side(kinds, config.text_modality, config.modality)
    templates = resolve_templates(config.templates, model.specs[config.modality].kind)
    name = config.name or config.data.source
    evaluation = EvaluationData(config.data, extraction or ExtractionConfig(),
                                ((config.modality, config.column),) if config.column else (), Path(base_dir))
    read = evaluation.read(model, [config.modality], progress)
    held = [r for r in read.records if config.modality in r.items]
    labelled = [r for r in held if r.label is not None]
    log.info("zero-shot %s: %d %s items with labels (%d without, %d unreadable records)", name, len(labelled),
             config.modality, len(held) - len(labelled), len(read.bad))
    items = embed_records(model, evaluation, config.modality, labelled, progress)
    bad = [b.row() for b in read.bad] + items.bad
    check_bad_fraction(bad, {config.modality: len(items.ids)}, config.data.max_bad_fraction)
    if len(items.ids) == 0:
        raise ValueError(f"zero-shot {name}: no usable labelled {config.modality} items in {config.data.source} data")
    targets, classes = encode_labels([str(x) for x in items.labels])
    class_vectors = class_embeddings(model, text, classes, templates)
    ranks, predicted = classify(items.vectors, class_vectors, targets)
    metrics, per_class, confusion = accuracy_metrics(ranks, predicted, targets, classes)
    counts: dict[str, Any] = {"records": len(read.records), "labelled": len(labelled),
                              "unlabelled": len(held) - len(labelled), "items": len(items.ids), "bad_items": len(bad),
                              "bad_by_reason": count_reasons(bad)}
    data = {"source": config.data.source, **config.data.source_options}
    result = ZeroShotResult(name, config.modality, text, classes, templates, metrics, per_class, confusion,
                            counts, data)
    log.info("zero-shot %s: top-1 %.4f (chance %.4f), top-%d %.4f over %d items, %d classes", name,
             metrics["top1"], metrics["chance/top1"], TOP_K, metrics[f"top{TOP_K}"], len(items.ids), len(classes))
    return result
