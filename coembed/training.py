"""Training: projection heads on cached embeddings with a contrastive loss per pair type.

All embeddings live on the training device as tensors, read from the store
straight onto it (in pinned chunks for a GPU); a step indexes them with a
random permutation. There is no per-item Python in the loop and no host
synchronisation inside an epoch: the loss is summed on the device and read
once per epoch. Every pair type of the recipe contributes one symmetric InfoNCE
term per step (a smaller pair set is cycled), so image-audio and audio-text
pairs train together. On CUDA the heads run under bf16 autocast by default
(``train.autocast``); the loss and the temperature stay in float32.

The options of the loop are small functions here: the loss (``train.loss``,
:class:`~coembed.losses.PairLoss`), the learning-rate schedule
(:func:`lr_factor`), latent mixup (:func:`mix_halves`) and label-aware
positives (:func:`excluded_negatives`).

Model selection is cheap at any scale: each validation (every
``train.validate_every`` epochs) ranks a fixed sample of the validation pairs
(``train.validation_sample``, drawn by group from the seed), and the full
validation set is ranked once, at the end, with the kept heads
(:meth:`Trainer.final_metrics`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coembed.config import Recipe, TrainConfig
from coembed.dataset import Dataset
from coembed.devices import resolve_device
from coembed.distributed import SINGLE, World, shard_batches
from coembed.errors import TooFewPairs
from coembed.extraction import ModalityEmbeddings
from coembed.losses import LearnableTemperature, PairLoss, info_nce_gathered, same_class
from coembed.metrics import (MEAN_R1, Duplicates, chunk_slices, find_duplicates, lower_is_better, mean_recall_at_1,
                             paired_retrieval, selectable_metrics)
from coembed.sources import Record
from coembed.store import Lookup, content_identity

log = logging.getLogger(__name__)

#: Rows moved to a GPU per pinned staging buffer.
DEVICE_CHUNK_ROWS = 65_536


@dataclass
class ValidationSet:
    """Aligned validation embeddings of one pair type (or a sample of them)."""

    a: str
    b: str
    vectors_a: torch.Tensor
    vectors_b: torch.Tensor
    #: class label of each pair (``None`` when unknown), for class-level retrieval
    labels: list[str | None] | None = None
    #: identical items and duplicate groups of the pairs (:func:`coembed.metrics.find_duplicates`; default:
    #: identical vectors)
    duplicates: Duplicates | None = None

    def __len__(self) -> int:
        return int(self.vectors_a.shape[0])

    def subset(self, positions: np.ndarray) -> ValidationSet:
        index = torch.as_tensor(positions, dtype=torch.long)
        device_index = index.to(self.vectors_a.device)
        return ValidationSet(self.a, self.b, self.vectors_a[device_index], self.vectors_b[device_index],
                             None if self.labels is None else [self.labels[i] for i in positions.tolist()],
                             None if self.duplicates is None else self.duplicates[index])


@dataclass
class PairSet:
    """Aligned encoder embeddings of one pair type, split into train and validation.

    The training pairs are tensors on the training device. The validation pairs
    are either tensors too (``val_a``, ``val_b``) or, for a pair set built from
    the store, read from it when asked for (:meth:`validation`): during training
    only model selection's sample of them is in memory.
    """

    a: str
    b: str
    train_a: torch.Tensor
    train_b: torch.Tensor
    val_a: torch.Tensor | None = None
    val_b: torch.Tensor | None = None
    #: class label of each validation pair (``None`` when unknown), for class-level retrieval
    val_labels: list[str | None] | None = None
    #: identical items and duplicate groups of the validation pairs (:func:`coembed.metrics.find_duplicates`;
    #: default: identical vectors)
    val_duplicates: Duplicates | None = None
    #: the record group of each validation pair (a video, a recording): a validation sample takes groups whole
    val_record_groups: Sequence[str] | None = None
    #: class of each training pair as an integer (-1: unknown), for label-aware positives (``train.label_positives``)
    train_labels: torch.Tensor | None = None
    #: the store rows of the training pairs' items, ``(rows of a, rows of b)`` (figures pick pairs by them)
    train_rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    #: where the validation vectors are read from when ``val_a``/``val_b`` are not held: the two lookups and the
    #: positions of the validation pairs' items in them
    val_source: tuple[Lookup, Lookup, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    #: the training pairs of all processes together when this one holds a shard of them
    #: (:meth:`coembed.distributed.World.shard`); ``None``: it holds them all
    train_total: int | None = None

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def n_train(self) -> int:
        return int(self.train_a.shape[0])

    @property
    def n_train_total(self) -> int:
        """Training pairs across every process's shard (:attr:`n_train` with one process)."""
        return self.n_train if self.train_total is None else self.train_total

    @property
    def n_val(self) -> int:
        if self.val_a is not None:
            return int(self.val_a.shape[0])
        return 0 if self.val_source is None else len(self.val_source[2])

    @property
    def device(self) -> torch.device:
        return self.train_a.device

    def to(self, device: torch.device) -> PairSet:
        """This pair set on ``device`` (itself when it is there already: nothing is copied)."""
        held = [t for t in (self.train_a, self.train_b, self.val_a, self.val_b) if t is not None]
        if all(t.device == torch.device(device) for t in held):
            return self
        return PairSet(self.a, self.b, self.train_a.to(device), self.train_b.to(device),
                       None if self.val_a is None else self.val_a.to(device),
                       None if self.val_b is None else self.val_b.to(device), self.val_labels, self.val_duplicates,
                       self.val_record_groups, None if self.train_labels is None else self.train_labels.to(device),
                       self.train_rows, self.val_source, self.train_total)

    def validation(self, positions: np.ndarray | None = None) -> ValidationSet:
        """The validation pairs (those at ``positions``, default all) on the pair set's device."""
        if self.val_a is not None and self.val_b is not None:
            full = ValidationSet(self.a, self.b, self.val_a, self.val_b, self.val_labels, self.val_duplicates)
            return full if positions is None else full.subset(positions)
        if self.val_source is None:
            empty = self.train_a.new_zeros((0, self.train_a.shape[1])), self.train_b.new_zeros((0, self.train_b.shape[1]))
            return ValidationSet(self.a, self.b, *empty, [], None)
        lookup_a, lookup_b, rows_a, rows_b = self.val_source
        chosen = np.arange(len(rows_a)) if positions is None else np.asarray(positions, dtype=np.int64)
        return ValidationSet(self.a, self.b, vectors_on(lookup_a, rows_a[chosen], self.device),
                             vectors_on(lookup_b, rows_b[chosen], self.device),
                             None if self.val_labels is None else [self.val_labels[i] for i in chosen.tolist()],
                             None if self.val_duplicates is None else self.val_duplicates[chosen])

    def validation_sample(self, size: int | None, seed: int) -> ValidationSet:
        """About ``size`` validation pairs drawn by record group (whole groups), fixed by ``seed``; all with ``None``."""
        if size is None or self.n_val <= size:
            return self.validation()
        groups = [str(i) for i in range(self.n_val)] if self.val_record_groups is None else self.val_record_groups
        return self.validation(sample_by_group(groups, size, seed))

    def release_training_tensors(self) -> None:
        """Drop the training pairs' tensors (the final evaluation and the figures need none of them)."""
        self.train_a = self.train_a.new_zeros((0, self.train_a.shape[1]))
        self.train_b = self.train_b.new_zeros((0, self.train_b.shape[1]))
        self.train_labels = None


def sample_by_group(groups: Sequence[str], size: int, seed: int) -> np.ndarray:
    """Sorted positions of at least ``size`` items (all when fewer), taking the groups of ``groups`` whole in
    an order fixed by a hash of ``(seed, group)``, as the train/validation split orders them."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    order = sorted(by_group, key=lambda g: hashlib.sha256(f"{seed}\0validation-sample\0{g}".encode()).hexdigest())
    chosen: list[int] = []
    for g in order:
        if len(chosen) >= size:
            break
        chosen += by_group[g]
    return np.array(sorted(chosen), dtype=np.int64)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    #: the kept temperature (``None`` for a method without one)
    temperature: float | None
    seconds: float
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    #: validation pairs model selection ranked, per pair type: ``{"selection": n, "full": n}``
    validation_pairs: dict[str, dict[str, int]] = field(default_factory=dict)


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

    def duplicates(self, a: str, b: str) -> Duplicates:
        """The identical raw items (by content) of the pairs and their duplicate groups (see
        :func:`coembed.metrics.find_duplicates`): an item counts once in retrieval."""
        return find_duplicates([content_identity(r.items[a]) for r in self.records],
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


def vectors_on(lookup: Lookup, positions: Sequence[int], device: torch.device) -> torch.Tensor:
    """The vectors of items ``positions`` of a store lookup as one tensor on ``device``, with no full host copy
    for a GPU: rows are read into pinned staging buffers and copied asynchronously, chunk by chunk."""
    positions = np.asarray(positions, dtype=np.int64)
    if device.type != "cuda":
        return torch.from_numpy(lookup.gather(positions)).to(device)
    out = torch.empty((len(positions), lookup.dim), dtype=torch.float32, device=device)
    chunk = min(DEVICE_CHUNK_ROWS, max(len(positions), 1))
    staging = [torch.empty((chunk, lookup.dim), dtype=torch.float32).pin_memory() for _ in range(2)]
    done = [torch.cuda.Event(), torch.cuda.Event()]
    for k, sl in enumerate(chunk_slices(len(positions), chunk)):
        buf, event = staging[k % 2], done[k % 2]
        event.synchronize()  # the copy that last used this buffer has finished
        n = sl.stop - sl.start
        lookup.gather(positions[sl], out=buf[:n].numpy())
        out[sl].copy_(buf[:n], non_blocking=True)
        event.record()
    torch.cuda.current_stream(device).synchronize()
    return out


def project_normalized(head: nn.Module, vectors: torch.Tensor, chunk_size: int = 16_384) -> torch.Tensor:
    """``F.normalize(head(vectors))`` built chunk by chunk into one new tensor (never the input itself)."""
    out: torch.Tensor | None = None
    for sl in chunk_slices(vectors.shape[0], chunk_size):
        part = F.normalize(head(vectors[sl]).float(), dim=-1)
        if out is None:
            out = part.new_empty((vectors.shape[0], part.shape[1]))
        out[sl] = part
    return out if out is not None else vectors.new_zeros((0, vectors.shape[1])).float()


def evaluate(heads: nn.ModuleDict, sets: Sequence[ValidationSet], chunk_size: int = 1024,
             class_level: bool = False, instance_level: bool = True) -> dict[str, float]:
    """Retrieval metrics of every validation set (sets of fewer than 2 pairs are left out), plus ``mean_r1``.

    ``class_level`` adds class-level retrieval for sets with labels; ``instance_level=False`` leaves the
    instance-level metrics out (when they are known already).
    """
    metrics: dict[str, float] = {}
    was_training = heads.training
    heads.eval()
    with torch.no_grad():
        for v in sets:
            if len(v) < 2:
                continue
            metrics.update(paired_retrieval(project_normalized(heads[v.a], v.vectors_a),
                                            project_normalized(heads[v.b], v.vectors_b), v.a, v.b, chunk_size,
                                            labels=v.labels if class_level else None, duplicates=v.duplicates,
                                            normalized=True, instance_level=instance_level))
    heads.train(was_training)
    if instance_level:
        metrics[MEAN_R1] = mean_recall_at_1(metrics)
    return metrics


def evaluate_pairs(heads: nn.ModuleDict, pairs: Sequence[PairSet], chunk_size: int = 1024,
                   class_level: bool = False) -> dict[str, float]:
    """Retrieval metrics of every pair type's whole validation set, plus ``mean_r1``."""
    return evaluate(heads, [p.validation() for p in pairs], chunk_size, class_level)


def check_select_metric(metric: str, pairs: Sequence[PairSet]) -> None:
    """:class:`KeyError` when ``train.select_metric`` is no value of these pair types' validation rows."""
    known = selectable_metrics((p.a, p.b) for p in pairs)
    if metric not in known:
        raise KeyError(f"train.select_metric {metric!r} is not a validation metric; known: {', '.join(known)}")


def selection_sizes(pairs: Sequence[PairSet], selection: Sequence[ValidationSet]) -> dict[str, dict[str, int]]:
    """Per pair type, the validation pairs model selection ranks and all of them: ``{"selection": n, "full": n}``."""
    return {p.name: {"selection": len(s), "full": p.n_val} for p, s in zip(pairs, selection)}


def selection_is_full(sizes: dict[str, dict[str, int]]) -> bool:
    """Whether model selection ranked every validation pair (``sizes``: ``{"selection": n, "full": n}`` by pair
    type: each validation set was no larger than the sample)."""
    return all(s["selection"] == s["full"] for s in sizes.values())


def final_retrieval(heads: nn.ModuleDict, pairs: Sequence[PairSet], sizes: dict[str, dict[str, int]],
                    best_metrics: dict[str, float], chunk_size: int = 1024) -> dict[str, float]:
    """Retrieval of ``heads`` on every validation pair, instance and class level, computed once.

    When model selection already ranked every validation pair (``sizes``: ``{"selection": n, "full": n}``
    by pair type), its instance-level metrics of the kept heads (``best_metrics``) are those, and only
    the class level is computed here.
    """
    full = [p.validation() for p in pairs]
    if best_metrics and selection_is_full(sizes):
        return {**best_metrics, **evaluate(heads, full, chunk_size, class_level=True, instance_level=False)}
    return evaluate(heads, full, chunk_size, class_level=True)


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether epoch value ``new`` replaces the best so far, ``old``.

    Until some epoch has a value (no validation pairs: every value is NaN) the
    latest epoch is the best, so such a run keeps its last heads.
    """
    if old is None or math.isnan(old):
        return True
    return new < old if lower_is_better(metric) else new > old


# ---------------------------------------------------------------------------------------
# options of the training loop
# ---------------------------------------------------------------------------------------


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, or ``train.warmup_fraction`` of ``total_steps``."""
    return config.warmup_steps or int(round(config.warmup_fraction * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (from 0) over ``train.lr``: linear warmup from 0 over
    ``warmup`` steps (step ``warmup - 1`` reaches the full rate), then constant or a cosine decay that
    reaches 0 after the last of ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay = max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))


def mix_halves(x_a: torch.Tensor, x_b: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mixup (FuseMix): pair ``i`` of the first half of a batch mixed with pair ``i`` of the second,
    ``lam * first + (1 - lam) * second``, with the same ``lam`` on both sides: ``batch // 2`` pairs."""
    h = x_a.shape[0] // 2
    return (lam * x_a[:h] + (1.0 - lam) * x_a[h:2 * h], lam * x_b[:h] + (1.0 - lam) * x_b[h:2 * h])


def excluded_negatives(labels: torch.Tensor | None, mixed: bool) -> torch.Tensor | None:
    """The pairs of a batch that are not negatives, for label-aware positives: the same class
    (:func:`~coembed.losses.same_class`); after mixup, the same classes in both halves mixed."""
    if labels is None:
        return None
    if not mixed:
        return same_class(labels)
    h = labels.shape[0] // 2
    return same_class(labels[:h]) & same_class(labels[h:2 * h])


def class_ids(labels: Sequence[str | None]) -> torch.Tensor:
    """Labels as integers (in order of first appearance); ``None`` is -1."""
    ids: dict[str, int] = {}
    return torch.tensor([-1 if x is None else ids.setdefault(x, len(ids)) for x in labels], dtype=torch.long)


def distributed_unsupported(config: TrainConfig) -> list[str]:
    """The options of ``config`` that training on several processes does not support (its gathered loss is the
    symmetric InfoNCE over the global batch, without mixup or label-aware positives)."""
    return [f"{key}={value}" for key, value, default in (("train.loss", config.loss, "infonce"),
                                                         ("train.mixup", config.mixup, 0.0),
                                                         ("train.label_positives", config.label_positives, False))
            if value != default]


def use_autocast(config: TrainConfig, device: torch.device) -> bool:
    """``train.autocast``, or by default: on for CUDA, off elsewhere."""
    return device.type == "cuda" if config.autocast is None else bool(config.autocast)


class Trainer:
    """Fits ``heads`` so paired embeddings meet in the anchor space.

    With several processes (``world``, see :mod:`coembed.distributed`) each holds a shard of every pair type's
    training pairs; a step's contrastive batch is the global one (``train.batch_size`` pairs, of which this
    process holds about ``1 / world_size``), its embeddings gathered across processes with their gradients,
    and the gradients summed: every process takes the step one process would take on the whole batch. Model
    selection runs on process 0 and its metrics are sent to the others, so all keep the same heads.
    """

    def __init__(self, heads: nn.ModuleDict, pairs: list[PairSet], config: TrainConfig, seed: int = 0,
                 world: World = SINGLE) -> None:
        self.config = config
        self.world = world
        self.device = world.device(resolve_device(config.device))
        self.heads = heads.to(self.device)
        self.pairs = [p.to(self.device) for p in pairs]
        t = config.temperature
        self.temperature = LearnableTemperature(t.init, t.learnable, t.min).to(self.device)
        self.loss = PairLoss(config.loss, config.sigmoid.bias_init, config.sigmoid.learnable_bias).to(self.device)
        if world.distributed and (unsupported := distributed_unsupported(config)):
            raise ValueError(f"training on several processes supports the symmetric InfoNCE alone; "
                             f"this recipe sets {', '.join(unsupported)}")
        world.broadcast_tensors([*self.heads.state_dict().values(), *self.temperature.state_dict().values()])
        if config.label_positives and all(p.train_labels is None for p in self.pairs):
            log.warning("train.label_positives: no training pair has a label; every other pair is a negative")
        self.seed = seed
        self.autocast = use_autocast(config, self.device)
        if self.autocast and self.device.type != "cuda":
            log.info("train.autocast on %s: bf16 autocast of the heads on the CPU", self.device)
        params = [p for p in [*self.heads.parameters(), *self.temperature.parameters(), *self.loss.parameters()]
                  if p.requires_grad]
        if not any(p.requires_grad for p in self.heads.parameters()):
            raise ValueError("no head has trainable parameters: every pair joins two identity heads")
        opt = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self._params = params
        self.optimizer = opt(params, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = max(math.ceil(p.n_train_total / min(config.batch_size, max(p.n_train_total, 1)))
                                   for p in self.pairs)
        total = config.epochs * self.steps_per_epoch
        warmup = warmup_steps(config, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total, warmup, config.schedule))
        self._mixup = torch.distributions.Beta(config.mixup, config.mixup) if config.mixup > 0 else None
        #: what each validation ranks: a fixed sample of every pair type's validation pairs (process 0 only)
        self.selection = [p.validation_sample(config.validation_sample, seed) for p in self.pairs] if world.is_main else []
        self._sizes = world.broadcast_object(selection_sizes(self.pairs, self.selection))
        self._workspaces: list[torch.Tensor] = []

    @property
    def selection_is_full(self) -> bool:
        """Whether model selection ranked every validation pair (the set was no larger than the sample)."""
        return selection_is_full(self._sizes)

    def _batch(self, p: PairSet, idx: torch.Tensor, lam: float | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The encoder vectors of one step's pairs (mixed with ``lam``) and the pairs that are not negatives."""
        x_a, x_b = p.train_a[idx], p.train_b[idx]
        labels = p.train_labels[idx] if self.config.label_positives and p.train_labels is not None else None
        if lam is not None:
            x_a, x_b = mix_halves(x_a, x_b, lam)
        return x_a, x_b, excluded_negatives(labels, mixed=lam is not None)

    def _epoch(self, generator: torch.Generator) -> float:
        bs = self.config.batch_size
        plans = []
        for p in self.pairs:
            n = p.n_train_total
            b = min(bs, n)
            batches = shard_batches(torch.randperm(n, generator=generator), b, self.world)
            if self.device.type == "cuda":
                batches.local = batches.local.pin_memory().to(self.device, non_blocking=True)
            plans.append((p, batches, b, len(batches)))
        steps = max(s for *_, s in plans)
        if len(self._workspaces) != len(plans) and not self.world.distributed:
            # one logits buffer per pair type, reused by every step
            self._workspaces = [torch.empty(b * b, device=self.device) for _, _, b, _ in plans]
        total = torch.zeros((), device=self.device)  # summed on the device: no host synchronisation per step
        count = 0
        for step in range(steps):
            loss = torch.zeros((), device=self.device)
            scale = self.temperature()
            # one mixup lambda per step, shared by every modality and pair type (torch.manual_seed of fit)
            lam = None if self._mixup is None else float(self._mixup.sample())
            for k, (p, batches, _, n_steps) in enumerate(plans):
                idx, counts = batches.batch(step % n_steps)  # counts: this batch's pairs on every process
                if sum(counts) < (2 if lam is None else 4):
                    continue
                x_a, x_b, excluded = self._batch(p, idx, lam)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    za, zb = self.heads[p.a](x_a), self.heads[p.b](x_b)
                if self.world.distributed:  # this process's share of the global batch's loss
                    loss = loss + info_nce_gathered(za, zb, scale, lambda x: self.world.gather_rows(x, counts),
                                                    self.world.logsumexp)
                else:  # float32, outside autocast
                    loss = loss + self.loss(za, zb, scale, self._workspaces[k], excluded)
                del za, zb, x_a, x_b  # held by the graph alone, freed with it
            if not loss.requires_grad:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.world.sum_gradients(self._params)
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach()
            count += 1
            del loss
        return float(self.world.sum(total)) / max(count, 1)

    def fit(self, on_epoch: Callable[[dict[str, float]], None] | None = None, progress: bool = True) -> TrainResult:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        metric = self.config.select_metric
        check_select_metric(metric, self.pairs)
        history: list[dict[str, float]] = []
        best_value: float | None = None
        best_epoch, best_metrics, best_state = 0, {}, self._state()
        since_best = 0
        start = time.perf_counter()
        epochs, every = self.config.epochs, self.config.validate_every
        bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress, dynamic_ncols=True)
        for epoch in bar:
            self.heads.train()
            t0 = time.perf_counter()
            loss = self._epoch(generator)
            validated = epoch % every == 0 or epoch == epochs
            metrics = self._validate() if validated else {}
            row = {"epoch": epoch, "loss": loss, "temperature": self.temperature.temperature,
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, **metrics}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            if not validated:
                bar.set_postfix(loss=f"{loss:.4f}")
                continue
            value = row.get(metric, float("nan"))
            if better(metric, value, best_value):
                best_value, best_epoch, best_metrics, best_state = value, epoch, metrics, self._state()
                since_best = 0
            else:
                since_best += every
            bar.set_postfix(loss=f"{loss:.4f}", **{metric: f"{value:.4f}"})
            if self.config.patience is not None and since_best >= self.config.patience:
                log.info("no %s improvement for %d epochs: stopping at epoch %d", metric, since_best, epoch)
                break
        self._load_state(best_state)
        sizes = self._sizes
        return TrainResult(history, best_epoch, best_metrics, self.temperature.temperature,
                           time.perf_counter() - start, best_state, sizes)

    def _validate(self) -> dict[str, float]:
        """Model selection's metrics of the current heads: ranked by process 0, the same on every process."""
        return self.world.broadcast_object(evaluate(self.heads, self.selection) if self.world.is_main else None)

    def final_metrics(self, best_metrics: dict[str, float], chunk_size: int = 1024) -> dict[str, float]:
        """Retrieval of the kept heads on every validation pair, instance and class level, computed once.

        When model selection already ranked every validation pair, its instance-level metrics of the
        best epoch (``best_metrics``) are those, and only the class level is computed here.
        """
        self.selection = []  # the sample's memory, before every validation pair is read
        return final_retrieval(self.heads, self.pairs, self._sizes, best_metrics, chunk_size)

    def release_training_tensors(self) -> None:
        """Free the training pairs' memory once training is over (the final evaluation needs none of it)."""
        for p in self.pairs:
            p.release_training_tensors()
        self._workspaces = []

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        state.update({f"temperature.{k}": v for k, v in self.temperature.state_dict().items()})
        state.update({f"loss.{k}": v for k, v in self.loss.state_dict().items()})
        return copy.deepcopy({k: v.detach().cpu() for k, v in state.items()})

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
        self.temperature.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("temperature.")})
        self.loss.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("loss.")})


def build_pair_sets(recipe: Recipe, dataset: Dataset, embedded: dict[str, ModalityEmbeddings],
                    device: torch.device | None = None, world: World = SINGLE) -> list[PairSet]:
    """The train and validation pairs of every pair type of the recipe, from the usable embedded items,
    read from the store straight onto ``device`` (default: the training device). With several processes
    (``world``) only this process's shard of the training pairs is read (:meth:`~coembed.distributed.World.shard`).

    :class:`~coembed.errors.TooFewPairs` when a pair type has fewer than 2 training pairs.
    """
    device = world.device(device or resolve_device(recipe.train.device))
    pairs = []
    for a, b in recipe.pairs:
        ea, eb = embedded[a], embedded[b]
        train = align_pairs(dataset.train, ea.ok_row, eb.ok_row)
        if len(train) < 2:
            raise TooFewPairs(f"pair type {a}-{b} has {len(train)} usable training pairs; "
                              "at least 2 are needed (see bad_items.jsonl)")
        val = align_pairs(dataset.validation, ea.ok_row, eb.ok_row)
        held = world.shard(len(train))
        rows_a, rows_b = np.asarray(train.rows_a, dtype=np.int64)[held], np.asarray(train.rows_b, dtype=np.int64)[held]
        # the classes of the training pairs matter only to label-aware positives
        train_labels = [train.records[i].label for i in held.tolist()] if recipe.train.label_positives else []
        pair = PairSet(a, b, vectors_on(ea.lookup, rows_a, device), vectors_on(eb.lookup, rows_b, device),
                       # interned labels and a numpy array of groups: nothing keeps the records' own strings alive
                       val_labels=[None if r.label is None else sys.intern(r.label) for r in val.records],
                       val_duplicates=val.duplicates(a, b),
                       val_record_groups=np.array([r.group for r in val.records], dtype=str),
                       train_labels=class_ids(train_labels).to(device) if any(train_labels) else None,
                       train_rows=(rows_a, rows_b),
                       val_source=(ea.lookup, eb.lookup, np.asarray(val.rows_a, dtype=np.int64),
                                   np.asarray(val.rows_b, dtype=np.int64)),
                       train_total=len(train) if world.distributed else None)
        log.info("pair type %s: %d train pairs, %d validation pairs", pair.name, pair.n_train_total, len(val))
        pairs.append(pair)
    return pairs
