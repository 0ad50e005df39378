"""Extraction: frozen encoders over records, into the embedding store.

Items are decoded in DataLoader worker processes (``adapter.load``) while the
main process runs the encoder (``adapter.encode``) batch after batch. Results
go to the store in shards of ``shard_size`` items; a re-run skips every item
whose key is already stored, so a killed extraction resumes where its last
finished shard ended and a second run over the same data calls no encoder.
Items that cannot be loaded or encode to NaN/inf are stored with their reason
and never retried until their content changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from coembed.data import reason_kind
from coembed.registry import Adapter, BadItem
from coembed.store import EmbeddingStore, Lookup, item_key

log = logging.getLogger(__name__)


class _LoadItems(TorchDataset):
    """Runs ``adapter.load`` in a worker; a failure becomes a reason, never an exception."""

    def __init__(self, adapter: Adapter, items: Sequence[Any]) -> None:
        self.adapter = adapter
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            return index, self.adapter.load(self.items[index]), None
        except BadItem as exc:
            return index, None, str(exc)
        except Exception as exc:  # an unexpected decoder error is still one bad item
            return index, None, f"{type(exc).__name__}: {exc}"


class _Collate:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(self, rows: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
        good = [(i, x) for i, x, err in rows if err is None]
        bad = [(i, err) for i, _, err in rows if err is not None]
        batch = self.adapter.collate([x for _, x in good]) if good else None
        return [i for i, _ in good], batch, bad


@dataclass
class ExtractionStats:
    modality: str
    fingerprint: str
    items: int = 0
    cached: int = 0
    encoded: int = 0
    bad: int = 0
    seconds: float = 0.0
    bad_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


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
) -> tuple[Lookup, ExtractionStats]:
    """Encode ``items`` (raw inputs of ``adapter.modality``, one per id) into the store.

    Returns the embeddings of all items, in order (cached and new alike), and
    statistics of the work done.
    """
    from tqdm.auto import tqdm

    store = EmbeddingStore(store_root, adapter.fingerprint, adapter.dim,
                           meta={"adapter": adapter.key(), "config": adapter.config()})
    store.clean_partial()
    keys = [item_key(i, x) for i, x in zip(ids, items)]
    done = store.keys()
    todo = [n for n, k in enumerate(keys) if k not in done]
    stats = ExtractionStats(adapter.modality, adapter.fingerprint, items=len(keys), cached=len(keys) - len(todo))
    start = time.perf_counter()
    if todo:
        loader = DataLoader(
            _LoadItems(adapter, [items[n] for n in todo]),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_Collate(adapter),
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        buf_idx: list[int] = []
        buf_vec: list[np.ndarray] = []
        buf_err: list[str | None] = []

        def flush() -> None:
            if buf_idx:
                rows = [todo[j] for j in buf_idx]
                store.write_shard([keys[r] for r in rows], [str(ids[r]) for r in rows],
                                  np.stack(buf_vec), buf_err)
                buf_idx.clear(), buf_vec.clear(), buf_err.clear()

        zero = np.zeros(adapter.dim, dtype=np.float32)
        bar = tqdm(total=len(todo), desc=f"encode {adapter.modality} ({adapter.key()})", unit="item",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for good, batch, bad in loader:
                if good:
                    try:
                        vectors = adapter.encode(batch).numpy()
                    except Exception as exc:  # one failing batch: retry its items one by one
                        vectors, errs = _encode_one_by_one(adapter, loader.dataset, good, exc)
                    else:
                        errs = [None] * len(good)
                    finite = np.isfinite(vectors).all(axis=1)
                    for j, vec, err, fin in zip(good, vectors, errs, finite):
                        if err is None and not fin:
                            err = "encoder produced NaN or infinite values"
                        buf_idx.append(j), buf_vec.append(vec if err is None else zero), buf_err.append(err)
                for j, err in bad:
                    buf_idx.append(j), buf_vec.append(zero), buf_err.append(err)
                bar.update(len(good) + len(bad))
                if len(buf_idx) >= shard_size:
                    flush()
            flush()
        stats.encoded = len(todo)
    stats.seconds = time.perf_counter() - start
    result = store.lookup(keys)
    stats.bad = len(result.errors) + len(result.missing)
    for reason in result.errors.values():
        stats.bad_reasons[reason_kind(reason)] = stats.bad_reasons.get(reason_kind(reason), 0) + 1
    return result, stats


def _encode_one_by_one(adapter: Adapter, dataset: _LoadItems, good: list[int],
                       exc: Exception) -> tuple[np.ndarray, list[str | None]]:
    log.warning("batch of %s failed to encode (%s); retrying item by item", adapter.modality, exc)
    vectors = np.zeros((len(good), adapter.dim), dtype=np.float32)
    errs: list[str | None] = []
    for n, j in enumerate(good):
        try:
            vectors[n] = adapter.encode(adapter.collate([adapter.load(dataset.items[j])])).numpy()[0]
            errs.append(None)
        except Exception as item_exc:
            errs.append(f"encoder failed: {type(item_exc).__name__}: {item_exc}")
    return vectors, errs

