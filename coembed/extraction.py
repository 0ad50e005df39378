"""Extraction: frozen encoders over records, into the embedding store.

Items are decoded in DataLoader worker processes (``adapter.load``) while the
main process runs the encoder (``adapter.encode``) batch after batch. Results
go to the store in shards of ``shard_size`` items; a re-run skips every item
whose key is already stored, so a killed extraction resumes where its last
finished shard ended and a second run over the same data calls no encoder.
Items that cannot be loaded or encode to NaN/inf are stored with their reason
and never retried until their content changes; items refused by a setting
(:class:`~coembed.media.OverLimit`, e.g. the image pixel limit) are reported
but not stored, so changing the setting takes effect on the next run.

Each ``adapter.load`` runs inside :func:`coembed.media.decoding`: the recipe's
pixel limit reaches :func:`~coembed.media.load_image`, and the level of every
decoded sound is stored with its embedding, so silent audio is flagged (or
dropped) by the threshold of the current run, without encoding anything again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from coembed.bad_items import BadItemRow, reason_kind
from coembed.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_SILENCE_DB, DataConfig, ExtractionConfig, Recipe
from coembed.dataset import Dataset
from coembed.errors import BadItem, OverLimit
from coembed.layout import store_root
from coembed.media import AUDIO_DB, SILENCE_FLOOR_DB, decoding, safe_text
from coembed.registry import Adapter
from coembed.store import EmbeddingStore, Lookup, item_key

log = logging.getLogger(__name__)

#: The reason kind of a silent audio item (see :func:`coembed.bad_items.reason_kind`).
SILENT_AUDIO = "silent audio"


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
                        data: DataConfig, base_dir: str | Path = ".", progress: bool = True
                        ) -> tuple[Lookup, ExtractionStats]:
    """:func:`extract` with a recipe's (or an evaluation's) store, extraction settings and item checks."""
    checks = ItemChecks(data.max_image_pixels, data.silence_db, data.silent_audio == "drop")
    return extract(adapter, ids, items, store_root(extraction.cache_dir, base_dir), batch_size=extraction.batch_size,
                   num_workers=extraction.num_workers, shard_size=extraction.shard_size, progress=progress,
                   checks=checks)


#: One loaded item: index, loaded value (None when bad), reason, measurements, whether to store the reason.
_Row = tuple[int, Any, str | None, dict[str, float], bool]


class _LoadItems(TorchDataset):
    """Runs ``adapter.load`` in a worker; a failure becomes a reason, never an exception."""

    def __init__(self, adapter: Adapter, items: Sequence[Any], max_image_pixels: int | None) -> None:
        self.adapter = adapter
        self.items = items
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Any, dict[str, float]]:
        """``adapter.load`` of one item and the measurements taken while decoding it."""
        with decoding(self.max_image_pixels) as notes:
            return self.adapter.load(self.items[index]), notes

    def __getitem__(self, index: int) -> _Row:
        try:
            value, notes = self.load(index)
            return index, value, None, notes, True
        except OverLimit as exc:
            return index, None, safe_text(str(exc)), {}, False
        except BadItem as exc:
            return index, None, safe_text(str(exc)), {}, True
        except Exception as exc:  # an unexpected decoder error is still one bad item
            return index, None, safe_text(f"{type(exc).__name__}: {exc}"), {}, True


class _Collate:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(self, rows: list[_Row]) -> tuple[list[int], Any, list[dict[str, float]], list[tuple[int, str, bool]]]:
        good = [(i, x, notes) for i, x, err, notes, _ in rows if err is None]
        bad = [(i, err, store) for i, _, err, _, store in rows if err is not None]
        batch = self.adapter.collate([x for _, x, _ in good]) if good else None
        return [i for i, _, _ in good], batch, [notes for _, _, notes in good], bad


def extract(
    adapter: Adapter,
    ids: Sequence[str],
    items: Sequence[Any],
    store_root: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    shard_size: int = 1024,
    progress: bool = True,
    checks: ItemChecks | None = None,
) -> tuple[Lookup, ExtractionStats]:
    """Encode ``items`` (raw inputs of ``adapter.modality``, one per id) into the store.

    Returns the embeddings of all items, in order (cached and new alike), and
    statistics of the work done. ``checks`` sets the pixel limit and what
    happens to silent audio (flagged in ``Lookup.flags``, or made an error).
    """
    checks = checks or ItemChecks()
    store = EmbeddingStore(store_root, adapter.fingerprint, adapter.dim,
                           meta={"adapter": adapter.key(), "config": adapter.config()})
    store.clean_partial()
    keys = [item_key(i, x) for i, x in zip(ids, items)]
    done = store.keys()
    todo = [n for n, k in enumerate(keys) if k not in done]
    stats = ExtractionStats(adapter.modality, adapter.fingerprint, items=len(keys), cached=len(keys) - len(todo))
    start = time.perf_counter()
    refused: dict[int, str] = {}  # item index -> reason not stored (a setting refused the item)
    if todo:
        num_workers = usable_workers(num_workers)
        loader = DataLoader(
            _LoadItems(adapter, [items[n] for n in todo], checks.max_image_pixels),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_Collate(adapter),
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        buf_idx: list[int] = []
        buf_vec: list[np.ndarray] = []
        buf_err: list[str | None] = []
        buf_notes: list[dict[str, float] | None] = []

        def flush(limit: int) -> None:
            """Write full shards of ``shard_size`` items while the buffer holds ``limit`` or more."""
            while buf_idx and len(buf_idx) >= limit:
                n = min(shard_size, len(buf_idx))
                rows = [todo[j] for j in buf_idx[:n]]
                store.write_shard([keys[r] for r in rows], [str(ids[r]) for r in rows],
                                  np.stack(buf_vec[:n]), buf_err[:n], buf_notes[:n])
                del buf_idx[:n], buf_vec[:n], buf_err[:n], buf_notes[:n]

        zero = np.zeros(adapter.dim, dtype=np.float32)
        bar = tqdm(total=len(todo), desc=f"encode {adapter.modality} ({adapter.key()})", unit="item",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for good, batch, notes, bad in loader:
                if good:
                    try:
                        vectors = adapter.encode(batch).numpy()
                    except Exception as exc:  # one failing batch: retry its items one by one
                        vectors, errs = _encode_one_by_one(adapter, loader.dataset, good, exc)
                    else:
                        errs = [None] * len(good)
                    stats.encoded += len(good)
                    finite = np.isfinite(vectors).all(axis=1)
                    for j, vec, err, fin, note in zip(good, vectors, errs, finite, notes):
                        if err is None and not fin:
                            err = "encoder produced NaN or infinite values"
                        buf_idx.append(j), buf_vec.append(vec if err is None else zero), buf_err.append(err)
                        buf_notes.append(note)
                for j, err, store_it in bad:
                    if store_it:
                        buf_idx.append(j), buf_vec.append(zero), buf_err.append(err), buf_notes.append(None)
                    else:
                        refused[todo[j]] = err
                bar.update(len(good) + len(bad))
                flush(shard_size)
            flush(1)
    stats.seconds = time.perf_counter() - start
    result = store.lookup(keys)
    if refused:
        result.errors.update(refused)
        result.missing = [n for n in result.missing if n not in refused]
    _judge_silence(result, checks)
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
            result.vectors[i] = 0.0
        else:
            result.flags[i] = f"{reason} (kept: data.silent_audio=keep)"


def _encode_one_by_one(adapter: Adapter, dataset: _LoadItems, good: list[int],
                       exc: Exception) -> tuple[np.ndarray, list[str | None]]:
    log.warning("batch of %s failed to encode (%s); retrying item by item", adapter.modality, exc)
    vectors = np.zeros((len(good), adapter.dim), dtype=np.float32)
    errs: list[str | None] = []
    for n, j in enumerate(good):
        try:
            vectors[n] = adapter.encode(adapter.collate([dataset.load(j)[0]])).numpy()[0]
            errs.append(None)
        except Exception as item_exc:
            errs.append(f"encoder failed: {type(item_exc).__name__}: {item_exc}")
    return vectors, errs



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


def extract_dataset(recipe: Recipe, adapters: dict[str, Adapter], dataset: Dataset,
                    progress: bool = True) -> dict[str, ModalityEmbeddings]:
    """Every trained modality of the recipe over the records holding an item of it, through the store."""
    root = store_root(recipe.extraction.cache_dir, recipe.base_dir)
    out: dict[str, ModalityEmbeddings] = {}
    for m in recipe.trained_modalities():
        records = [r for r in dataset.records if m in r.items]
        log.info("extracting %d %s items with %s (store %s)", len(records), m, adapters[m].key(),
                 root / adapters[m].fingerprint)
        ids = [r.id for r in records]
        lookup, stats = extract_with_config(adapters[m], ids, [r.items[m] for r in records], recipe.extraction,
                                            recipe.data, recipe.base_dir, progress)
        log.info("%s: %d items, %d from the store, %d encoded in %.1fs (%.1f items/s), %d bad",
                 m, stats.items, stats.cached, stats.encoded, stats.seconds, stats.items_per_second, stats.bad)
        out[m] = ModalityEmbeddings(m, ids, lookup, stats)
    return out
