"""Training: projection heads on cached embeddings with a contrastive loss per pair type.

All embeddings live on the training device as tensors; a step indexes them
with a random permutation. There is no per-item Python in the loop. Every pair
type of the recipe contributes one symmetric InfoNCE term per step (a smaller
pair set is cycled), so image-audio and audio-text pairs train together.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from coembed.config import Recipe, TrainConfig
from coembed.dataset import Dataset
from coembed.devices import resolve_device
from coembed.errors import TooFewPairs
from coembed.extraction import ModalityEmbeddings
from coembed.losses import LearnableTemperature, info_nce
from coembed.metrics import (MEAN_R1, duplicate_groups, lower_is_better, mean_recall_at_1, paired_retrieval,
                             selectable_metrics)
from coembed.sources import Record
from coembed.store import content_identity

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """Aligned encoder embeddings of one pair type, split into train and validation."""

    a: str
    b: str
    train_a: torch.Tensor
    train_b: torch.Tensor
    val_a: torch.Tensor
    val_b: torch.Tensor
    #: class label of each validation pair (``None`` when unknown), for class-level retrieval
    val_labels: list[str | None] | None = None
    #: duplicate group of each validation pair (``evaluation.duplicate_groups``; default: identical vectors)
    val_groups: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    def to(self, device: torch.device) -> "PairSet":
        return PairSet(self.a, self.b, self.train_a.to(device), self.train_b.to(device), self.val_a.to(device),
                       self.val_b.to(device), self.val_labels, self.val_groups)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    temperature: float
    seconds: float
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


# ---------------------------------------------------------------------------------------
# pairs: the one place records are aligned into pairs
# ---------------------------------------------------------------------------------------


@dataclass
class AlignedPairs:
    """The records holding a usable item of both modalities of a pair type, and those items' rows."""

    records: list[Record]
    rows_a: list[int]
    rows_b: list[int]

    def __len__(self) -> int:
        return len(self.records)

    def duplicate_groups(self, a: str, b: str) -> torch.Tensor:
        """Pairs that share a raw item (by content) on either side form one group (see
        :func:`coembed.metrics.duplicate_groups`): an item counts once in retrieval."""
        return duplicate_groups([content_identity(r.items[a]) for r in self.records],
                                [content_identity(r.items[b]) for r in self.records])


def align_pairs(records: Sequence[Record], row_a: Callable[[str], int | None],
                row_b: Callable[[str], int | None]) -> AlignedPairs:
    """Pair each record's usable items: ``row_a(record id)`` is the row of its item of one modality, or
    ``None`` when it has no usable one; records usable on both sides become pairs, in their order."""
    aligned = AlignedPairs([], [], [])
    for r in records:
        ia, ib = row_a(r.id), row_b(r.id)
        if ia is not None and ib is not None:
            aligned.records.append(r)
            aligned.rows_a.append(ia)
            aligned.rows_b.append(ib)
    return aligned


def evaluate_pairs(heads: nn.ModuleDict, pairs: list[PairSet], chunk_size: int = 1024,
                   class_level: bool = False) -> dict[str, float]:
    """Validation retrieval metrics of every pair type, plus ``mean_r1``.

    ``class_level`` adds class-level retrieval for pair sets with ``val_labels``.
    """
    metrics: dict[str, float] = {}
    was_training = heads.training
    heads.eval()
    with torch.no_grad():
        for p in pairs:
            if p.val_a.shape[0] < 2:
                continue
            labels = p.val_labels if class_level else None
            metrics.update(paired_retrieval(heads[p.a](p.val_a), heads[p.b](p.val_b), p.a, p.b, chunk_size,
                                            labels=labels, groups=p.val_groups))
    heads.train(was_training)
    metrics[MEAN_R1] = mean_recall_at_1(metrics)
    return metrics


def _better(metric: str, new: float, old: float | None) -> bool:
    """Whether epoch value ``new`` replaces the best so far, ``old``.

    Until some epoch has a value (no validation pairs: every value is NaN) the
    latest epoch is the best, so such a run keeps its last heads.
    """
    if old is None or math.isnan(old):
        return True
    return new < old if lower_is_better(metric) else new > old


class Trainer:
    """Fits ``heads`` so paired embeddings meet in the anchor space."""

    def __init__(self, heads: nn.ModuleDict, pairs: list[PairSet], config: TrainConfig, seed: int = 0) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.heads = heads.to(self.device)
        self.pairs = [p.to(self.device) for p in pairs]
        t = config.temperature
        self.temperature = LearnableTemperature(t.init, t.learnable, t.min).to(self.device)
        self.seed = seed
        params = [p for p in list(self.heads.parameters()) + list(self.temperature.parameters()) if p.requires_grad]
        if not any(p.requires_grad for p in self.heads.parameters()):
            raise ValueError("no head has trainable parameters: every pair joins two identity heads")
        opt = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt(params, lr=config.lr, weight_decay=config.weight_decay)

    def _epoch(self, generator: torch.Generator) -> float:
        bs = self.config.batch_size
        plans = []
        for p in self.pairs:
            n = p.train_a.shape[0]
            b = min(bs, n)
            perm = torch.randperm(n, generator=generator).to(self.device)
            plans.append((p, perm, b, math.ceil(n / b)))
        steps = max(s for *_, s in plans)
        total, count = 0.0, 0
        for step in range(steps):
            loss = torch.zeros((), device=self.device)
            scale = self.temperature()
            for p, perm, b, n_steps in plans:
                idx = perm[(step % n_steps) * b:(step % n_steps + 1) * b]
                if idx.numel() < 2:
                    continue
                loss = loss + info_nce(self.heads[p.a](p.train_a[idx]), self.heads[p.b](p.train_b[idx]), scale)
            if not loss.requires_grad:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            count += 1
        return total / max(count, 1)

    def fit(self, on_epoch: Callable[[dict[str, float]], None] | None = None, progress: bool = True) -> TrainResult:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        metric = self.config.select_metric
        known = selectable_metrics((p.a, p.b) for p in self.pairs)
        if metric not in known:
            raise KeyError(f"train.select_metric {metric!r} is not a validation metric; known: {', '.join(known)}")
        history: list[dict[str, float]] = []
        best_value: float | None = None
        best_epoch, best_metrics, best_state = 0, {}, self._state()
        since_best = 0
        start = time.perf_counter()
        bar = tqdm(range(1, self.config.epochs + 1), desc="train", unit="epoch", disable=not progress,
                   dynamic_ncols=True)
        for epoch in bar:
            self.heads.train()
            t0 = time.perf_counter()
            loss = self._epoch(generator)
            metrics = evaluate_pairs(self.heads, self.pairs)
            row = {"epoch": epoch, "loss": loss, "temperature": self.temperature.temperature,
                   "seconds": time.perf_counter() - t0, **metrics}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            value = row.get(metric, float("nan"))
            if _better(metric, value, best_value):
                best_value, best_epoch, best_metrics, best_state = value, epoch, metrics, self._state()
                since_best = 0
            else:
                since_best += 1
            bar.set_postfix(loss=f"{loss:.4f}", **{metric: f"{value:.4f}"})
            if self.config.patience is not None and since_best >= self.config.patience:
                log.info("no %s improvement for %d epochs: stopping at epoch %d", metric, since_best, epoch)
                break
        self._load_state(best_state)
        return TrainResult(history, best_epoch, best_metrics, self.temperature.temperature,
                           time.perf_counter() - start, best_state)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        state.update({f"temperature.{k}": v for k, v in self.temperature.state_dict().items()})
        return copy.deepcopy({k: v.detach().cpu() for k, v in state.items()})

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
        self.temperature.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("temperature.")})


def build_pair_sets(recipe: Recipe, dataset: Dataset, embedded: dict[str, ModalityEmbeddings]) -> list[PairSet]:
    """The train and validation pairs of every pair type of the recipe, from the usable embedded items.

    :class:`~coembed.errors.TooFewPairs` when a pair type has fewer than 2 training pairs.
    """
    pairs = []
    for a, b in recipe.pairs:
        ea, eb = embedded[a], embedded[b]
        train = align_pairs(dataset.train, ea.ok_row, eb.ok_row)
        val = align_pairs(dataset.validation, ea.ok_row, eb.ok_row)
        pair = PairSet(a, b, torch.from_numpy(ea.lookup.gather(train.rows_a)),
                       torch.from_numpy(eb.lookup.gather(train.rows_b)),
                       torch.from_numpy(ea.lookup.gather(val.rows_a)), torch.from_numpy(eb.lookup.gather(val.rows_b)),
                       val_labels=[r.label for r in val.records], val_groups=val.duplicate_groups(a, b))
        log.info("pair type %s: %d train pairs, %d validation pairs", pair.name, len(pair.train_a), len(pair.val_a))
        if len(pair.train_a) < 2:
            raise TooFewPairs(f"pair type {pair.name} has {len(pair.train_a)} usable training pairs; "
                              "at least 2 are needed (see bad_items.jsonl)")
        pairs.append(pair)
    return pairs
