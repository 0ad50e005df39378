"""Extraction: frozen encoders over records, into the embedding store.

An engine decodes items (``adapter.load``) and runs the encoder
(``adapter.encode``) over them: the local engine (:class:`LocalEngine`) decodes
in DataLoader worker processes while the main process encodes batch after
batch; the Ray engine (:mod:`coembed.ray_extraction`) does both on a Ray
cluster. Either hands back batches of results (:class:`EncodedBatch`), and
:func:`extract` alone writes them, in the calling process, so keys, shards,
reasons and resume are the same whichever engine ran. Results go to the store
in shards of ``shard_size`` items; a re-run skips every item whose key is
already stored, so a killed extraction resumes where its last
finished shard ended and a second run over the same data calls no encoder.
Items that cannot be loaded or encode to NaN/inf are stored with their reason
and never retried until their content changes; items refused by a setting
(:class:`~coembed.media.OverLimit`, e.g. the image pixel limit) are reported
but not stored, so changing the setting takes effect on the next run.

Each ``adapter.load`` runs inside :func:`coembed.media.decoding`: the recipe's
pixel limit reaches :func:`~coembed.media.load_image`, and the level of every
decoded sound is stored with its embedding, so silent audio is flagged (or
dropped) by the threshold of the current run, without encoding anything again.
A clip an audio adapter padded or repeated to fill its encoder's window
(:func:`~coembed.media.fit_audio`) is flagged the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from coembed.bad_items import BadItemRow, reason_kind
from coembed.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_SILENCE_DB, DataConfig, ExtractionConfig, Recipe
from coembed.dataset import Dataset
from coembed.errors import BadItem, OverLimit
from coembed.layout import store_root
from coembed.media import (AUDIO_DB, AUDIO_PADDED, AUDIO_REPEATED, AUDIO_WINDOW, SILENCE_FLOOR_DB, decoding,
                           safe_text)
from coembed.registry import Adapter
from coembed.store import EmbeddingStore, Lookup, item_key

log = logging.getLogger(__name__)

#: The reason kind of a silent audio item (see :func:`coembed.bad_items.reason_kind`).
SILENT_AUDIO = "silent audio"
#: The reason kind of a clip padded or repeated to fill its encoder's window.
SHORT_AUDIO = "short audio"


@dataclass(frozen=True)
class ItemChecks:
    """Settings that judge items as they are decoded (and, for silence, after)."""

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    silence_db: float = DEFAULT_SILENCE_DB
    drop_silent: bool = False


def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most one per CPU core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        log.info("extraction.num_workers=%d but %d CPU cores are usable: using %d workers",
                 requested, cores, cores)
        return cores
    return requested


@dataclass
class ExtractionStats:
    modality: str
    fingerprint: str
    items: int = 0
    cached: int = 0
    encoded: int = 0
    bad: int = 0
    flagged: int = 0
    seconds: float = 0.0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    flagged_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        """Items the encoder ran on per second of extraction (items that failed to load are not counted)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def extract_with_config(adapter: Adapter, ids: Sequence[str], items: Sequence[Any], extraction: ExtractionConfig,
                        data: DataConfig, base_dir: str | Path = ".", progress: bool = True,
                        engine: ExtractionEngine | None = None) -> tuple[Lookup, ExtractionStats]:
    """:func:`extract` with a recipe's (or an evaluation's) store, extraction settings and item checks.

    ``engine`` defaults to the local one with the settings' batch size and workers.
    """
    checks = ItemChecks(data.max_image_pixels, data.silence_db, data.silent_audio == "drop")
    return extract(adapter, ids, items, store_root(extraction.cache_dir, base_dir), batch_size=extraction.batch_size,
                   num_workers=extraction.num_workers, shard_size=extraction.shard_size, progress=progress,
                   checks=checks, engine=engine)


# ---------------------------------------------------------------------------------------
# one item loaded, one batch encoded: the steps every engine runs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unloadable:
    """Why an item could not be loaded; ``stored``: the reason goes into the store (False: a setting refused the
    item, :class:`~coembed.errors.OverLimit`, so it is reported but tried again on the next run)."""

    reason: str
    stored: bool


def load_item(adapter: Adapter, item: Any, max_image_pixels: int | None) -> tuple[Any, dict[str, float]] | Unloadable:
    """``adapter.load`` of one raw item and what decoding measured, or why it failed (never an exception)."""
    try:
        with decoding(max_image_pixels) as notes:
            return adapter.load(item), notes
    except OverLimit as exc:
        return Unloadable(safe_text(str(exc)), stored=False)
    except BadItem as exc:
        return Unloadable(safe_text(str(exc)), stored=True)
    except Exception as exc:  # an unexpected decoder error is still one bad item
        return Unloadable(safe_text(f"{type(exc).__name__}: {exc}"), stored=True)


def encode_checked(adapter: Adapter, batch: Any, n: int,
                   one: Callable[[int], Any]) -> tuple[np.ndarray, list[str | None]]:
    """``adapter.encode`` of a collated batch of ``n`` loaded items: ``[n, dim]`` vectors and a reason per item
    (``None``: good). A batch that fails is encoded again item by item (``one(k)``: the ``k``-th item's loaded
    value); an item that fails alone, or encodes to NaN/inf, gets a reason and a zero vector."""
    try:
        vectors = adapter.encode(batch).numpy()
        errs: list[str | None] = [None] * n
    except Exception as exc:  # one failing batch: retry its items one by one
        log.warning("batch of %s failed to encode (%s); retrying item by item", adapter.modality, exc)
        vectors = np.zeros((n, adapter.dim), dtype=np.float32)
        errs = []
        for k in range(n):
            try:
                vectors[k] = adapter.encode(adapter.collate([one(k)])).numpy()[0]
                errs.append(None)
            except Exception as item_exc:
                errs.append(f"encoder failed: {type(item_exc).__name__}: {item_exc}")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        errs = [e if e is not None or ok else "encoder produced NaN or infinite values" for e, ok in zip(errs, finite)]
    failed = np.array([e is not None for e in errs])
    if failed.any():
        vectors = np.where(failed[:, None], 0.0, vectors).astype(np.float32)
    return vectors, errs


@dataclass
class EncodedBatch:
    """What an engine hands back for some items of the work list (positions in it, not record indices)."""

    rows: list[int]                        # items to store, in this order
    vectors: np.ndarray                    # [len(rows), dim] float32; zeros where an error
    errors: list[str | None]               # per row: the reason (None: good)
    notes: list[dict[str, float] | None]   # per row: what decoding measured
    refused: dict[int, str]                # items refused by a setting: reported, not stored
    encoded: int                           # items the encoder ran on


class ExtractionEngine(Protocol):
    """Decodes and encodes a work list of raw items; :func:`extract` writes what it yields."""

    def batches(self, adapter: Adapter, work: Sequence[Any], checks: ItemChecks) -> Iterator[EncodedBatch]:
        """Every item of ``work`` exactly once, over all the batches yielded (in any order)."""
        ...


@dataclass
class _Loaded:
    """One batch as a worker loaded it: the items that loaded (collated) and those that did not."""

    good: list[int]                       # positions in the work list
    batch: Any                            # ``adapter.collate`` of their loaded values (None: none loaded)
    notes: list[dict[str, float]]         # what decoding measured, per good item
    bad: list[tuple[int, str, bool]]      # position, reason, whether to store the reason


class _LoadItems(TorchDataset):
    """Runs ``adapter.load`` in a worker, a whole batch per call; a failure becomes a reason, never an exception."""

    def __init__(self, adapter: Adapter, items: Sequence[Any], max_image_pixels: int | None,
                 in_workers: bool = False) -> None:
        self.adapter = adapter
        self.items = items
        self.max_image_pixels = max_image_pixels
        self.in_workers = in_workers

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Any, dict[str, float]]:
        """``adapter.load`` of one item and the measurements taken while decoding it (raises when it fails)."""
        with decoding(self.max_image_pixels) as notes:
            return self.adapter.load(self.items[index]), notes

    def __getitem__(self, index: int) -> _Loaded:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> _Loaded:
        """The DataLoader asks for a batch at once: one call per batch, collated in the worker."""
        loaded = _Loaded([], None, [], [])
        values = []
        for index in indices:
            outcome = load_item(self.adapter, self.items[index], self.max_image_pixels)
            if isinstance(outcome, Unloadable):
                loaded.bad.append((index, outcome.reason, outcome.stored))
            else:
                loaded.good.append(index)
                values.append(outcome[0])
                loaded.notes.append(outcome[1])
        if values:
            loaded.batch = self.adapter.collate(values)
            if self.in_workers:
                loaded.batch = _to_wire(loaded.batch)
        return loaded


def _as_loaded(loaded: _Loaded) -> _Loaded:
    """The DataLoader's collate step: the batch is already collated by :meth:`_LoadItems.__getitems__`."""
    return loaded


#: Tensors smaller than this travel from a worker pickled as numpy arrays: cheaper than a shared-memory
#: segment each (about 1 ms per tensor), which pays off only for large batches such as images.
_PICKLE_BELOW_BYTES = 1 << 20


@dataclass
class _Wired:
    """A small tensor on its way from a worker, as a numpy array."""

    array: np.ndarray


def _to_wire(value: Any) -> Any:
    """``value`` with its small tensors as :class:`_Wired` arrays (in tuples, lists, named tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return _Wired(value.numpy()) if value.device.type == "cpu" and value.nbytes < _PICKLE_BELOW_BYTES else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(_to_wire(v) for v in value)
    if type(value) in (tuple, list):
        return type(value)(_to_wire(v) for v in value)
    if type(value) is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    """The inverse of :func:`_to_wire`, in the main process."""
    if isinstance(value, _Wired):
        return torch.from_numpy(value.array)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(_from_wire(v) for v in value)
    if type(value) in (tuple, list):
        return type(value)(_from_wire(v) for v in value)
    if type(value) is dict:
        return {k: _from_wire(v) for k, v in value.items()}
    return value


class _ShardBuffer:
    """Encoded rows waiting for their shard: written in shards of ``shard_size`` rows, in arrival order."""

    def __init__(self, store: EmbeddingStore, keys: Sequence[str], ids: Sequence[str], shard_size: int) -> None:
        self.store, self.keys, self.ids, self.shard_size = store, keys, ids, shard_size
        self.rows: list[np.ndarray] = []          # item indices, per chunk
        self.vectors: list[np.ndarray] = []       # [n, dim] per chunk
        self.errors: list[str | None] = []
        self.notes: list[dict[str, float] | None] = []
        self.size = 0

    def add(self, rows: np.ndarray, vectors: np.ndarray, errors: list[str | None],
            notes: list[dict[str, float] | None]) -> None:
        self.rows.append(rows)
        self.vectors.append(vectors)
        self.errors += errors
        self.notes += notes
        self.size += len(rows)
        while self.size >= self.shard_size:
            self.flush(self.shard_size)

    def flush(self, limit: int | None = None) -> None:
        """Write the first ``limit`` rows (default: all) as one shard."""
        if not self.size:
            return
        rows, vectors = np.concatenate(self.rows), np.concatenate(self.vectors)
        n = self.size if limit is None else min(limit, self.size)
        self.store.write_shard([self.keys[r] for r in rows[:n]], [str(self.ids[r]) for r in rows[:n]], vectors[:n],
                               self.errors[:n], self.notes[:n])
        self.rows, self.vectors = ([rows[n:]], [vectors[n:]]) if n < self.size else ([], [])
        del self.errors[:n], self.notes[:n]
        self.size -= n


class LocalEngine:
    """Items decoded in DataLoader worker processes on this machine, encoded batch after batch in this process."""

    def __init__(self, batch_size: int = 32, num_workers: int = 0) -> None:
        self.batch_size = batch_size
        self.num_workers = num_workers

    def batches(self, adapter: Adapter, work: Sequence[Any], checks: ItemChecks) -> Iterator[EncodedBatch]:
        num_workers = usable_workers(self.num_workers)
        loader = DataLoader(
            _LoadItems(adapter, work, checks.max_image_pixels, in_workers=num_workers > 0),
            batch_size=self.batch_size,
            num_workers=num_workers,
            collate_fn=_as_loaded,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        for loaded in loader:
            vectors, errs = np.zeros((0, adapter.dim), dtype=np.float32), []
            if loaded.good:
                vectors, errs = encode_checked(adapter, _from_wire(loaded.batch), len(loaded.good),
                                               lambda k: loader.dataset.load(loaded.good[k])[0])
            stored = [(j, err) for j, err, store_it in loaded.bad if store_it]
            yield EncodedBatch(
                rows=loaded.good + [j for j, _ in stored],
                vectors=np.concatenate([vectors, np.zeros((len(stored), adapter.dim), dtype=np.float32)]),
                errors=errs + [err for _, err in stored],
                notes=list(loaded.notes) + [None] * len(stored),
                refused={j: err for j, err, store_it in loaded.bad if not store_it},
                encoded=len(loaded.good))


def extract(
    adapter: Adapter,
    ids: Sequence[str],
    items: Sequence[Any],
    store_root: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    shard_size: int = 4096,
    progress: bool = True,
    checks: ItemChecks | None = None,
    engine: ExtractionEngine | None = None,
) -> tuple[Lookup, ExtractionStats]:
    """Encode ``items`` (raw inputs of ``adapter.modality``, one per id) into the store.

    Returns what the store holds for all items, in order (cached and new alike),
    and statistics of the work done. ``checks`` sets the pixel limit and what
    happens to silent audio (flagged in ``Lookup.flags``, or made an error).
    ``store_root`` is a folder or a URI :mod:`pyarrow.fs` opens. Only the items
    the store lacks go to the ``engine`` (default: :class:`LocalEngine` with
    ``batch_size`` and ``num_workers``); what it hands back is written here, in
    shards of ``shard_size`` items.
    """
    checks = checks or ItemChecks()
    engine = engine or LocalEngine(batch_size, num_workers)
    store = EmbeddingStore(store_root, adapter.fingerprint, adapter.dim,
                           meta={"adapter": adapter.key(), "config": adapter.config()})
    store.clean_partial()
    keys = [item_key(i, x) for i, x in zip(ids, items)]
    todo = np.flatnonzero(store.rows_of(keys) < 0)
    stats = ExtractionStats(adapter.modality, adapter.fingerprint, items=len(keys), cached=len(keys) - len(todo))
    start = time.perf_counter()
    refused: dict[int, str] = {}  # item index -> reason not stored (a setting refused the item)
    if len(todo):
        buffer = _ShardBuffer(store, keys, ids, shard_size)
        bar = tqdm(total=len(todo), desc=f"encode {adapter.modality} ({adapter.key()})", unit="item",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for batch in engine.batches(adapter, [items[n] for n in todo], checks):
                stats.encoded += batch.encoded
                if batch.rows:
                    buffer.add(todo[batch.rows], batch.vectors, batch.errors, batch.notes)
                refused.update({int(todo[j]): err for j, err in batch.refused.items()})
                bar.update(len(batch.rows) + len(batch.refused))
            buffer.flush()
    stats.seconds = time.perf_counter() - start
    result = store.lookup(keys)
    if refused:
        result.errors.update(refused)
        result.missing = [n for n in result.missing if n not in refused]
    _judge_silence(result, checks)
    _flag_short_audio(result)
    stats.bad = len(result.errors) + len(result.missing)
    stats.bad_reasons = dict(Counter(map(reason_kind, result.errors.values())))
    stats.flagged = len(result.flags)
    stats.flagged_reasons = dict(Counter(map(reason_kind, result.flags.values())))
    return result, stats


def _judge_silence(result: Lookup, checks: ItemChecks) -> None:
    """Flag (or, with ``drop_silent``, turn into errors) the good items whose audio level is too low."""
    for i, notes in result.notes.items():
        level = notes.get(AUDIO_DB)
        if level is None or level >= checks.silence_db or not result.ok[i]:
            continue
        level_text = "digital silence" if level <= SILENCE_FLOOR_DB else f"{level:.1f} dBFS"
        reason = f"{SILENT_AUDIO}: {level_text}, below {checks.silence_db:g} dBFS"
        if checks.drop_silent:
            result.errors[i] = f"{reason} (dropped: data.silent_audio=drop)"
            result.ok[i] = False
        else:
            result.flags[i] = f"{reason} (kept: data.silent_audio=keep)"


def _flag_short_audio(result: Lookup) -> None:
    """Flag the good items whose clip was padded or repeated to fill the encoder's window (after any
    silence flag of the same item)."""
    done = {AUDIO_PADDED: "padded with silence", AUDIO_REPEATED: "repeated"}
    for i, notes in result.notes.items():
        fitted = [(seconds, how) for name, how in done.items() if (seconds := notes.get(name)) is not None]
        if not fitted or not result.ok[i]:
            continue
        seconds, how = fitted[0]
        window = notes.get(AUDIO_WINDOW)
        reason = f"{SHORT_AUDIO}: {seconds:.3f} s, {how}" + (f" to the encoder's {window:.3f} s" if window else "")
        result.flags[i] = f"{result.flags[i]}; {reason}" if i in result.flags else reason


# ---------------------------------------------------------------------------------------
# a recipe's data set, every trained modality
# ---------------------------------------------------------------------------------------


@dataclass
class ModalityEmbeddings:
    """One modality's encoder embeddings for the records that hold an item of it."""

    modality: str
    ids: list[str]              # the records, in row order
    lookup: Lookup
    stats: ExtractionStats
    row_of: dict[str, int] = field(init=False)  # record id -> row

    def __post_init__(self) -> None:
        self.row_of = {rid: row for row, rid in enumerate(self.ids)}

    def ok_row(self, record_id: str) -> int | None:
        """The row of the record's item when it is usable (held and embedded), else None."""
        row = self.row_of.get(record_id)
        return row if row is not None and bool(self.lookup.ok[row]) else None

    def bad_rows(self) -> list[BadItemRow]:
        return self.lookup.bad_rows(self.ids, self.modality)

    def flagged_rows(self) -> list[BadItemRow]:
        return self.lookup.flagged_rows(self.ids, self.modality)


def extract_dataset(recipe: Recipe, adapters: dict[str, Adapter], dataset: Dataset, progress: bool = True,
                    engine: ExtractionEngine | None = None) -> dict[str, ModalityEmbeddings]:
    """Every trained modality of the recipe over the records holding an item of it, through the store
    (``engine``: default, the local one)."""
    root = store_root(recipe.extraction.cache_dir, recipe.base_dir)
    out: dict[str, ModalityEmbeddings] = {}
    for m in recipe.trained_modalities():
        records = [r for r in dataset.records if m in r.items]
        log.info("extracting %d %s items with %s (store %s/%s)", len(records), m, adapters[m].key(), root,
                 adapters[m].fingerprint)
        ids = [r.id for r in records]
        lookup, stats = extract_with_config(adapters[m], ids, [r.items[m] for r in records], recipe.extraction,
                                            recipe.data, recipe.base_dir, progress, engine)
        log.info("%s: %d items, %d from the store, %d encoded in %.1fs (%.1f items/s), %d bad",
                 m, stats.items, stats.cached, stats.encoded, stats.seconds, stats.items_per_second, stats.bad)
        out[m] = ModalityEmbeddings(m, ids, lookup, stats)
    return out
