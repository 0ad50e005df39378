"""The embedding store: encoder outputs cached as Arrow shards, keyed by item and encoder.

Layout::

    <root>/<fingerprint>/
        store.json                 adapter key, config, dim (written once)
        shard-<time>-<uid>/        one ``datasets`` Arrow table per shard, columns
                                   key, id, embedding (float32[dim]), error (null when good)

A shard is written to a temporary folder and renamed into place, so a reader
sees a shard whole or not at all; a killed run leaves at most a ``.tmp-*``
folder, which the next writer removes. The key of an item is derived from the
record id and the item's content identity (a file's path, size and mtime, or
a string's hash): change a file and it is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from coembed.media import AudioSegment, VideoFrame

DEFAULT_CACHE_DIR = Path(os.environ.get("COEMBED_CACHE", "~/.cache/coembed")).expanduser() / "embeddings"


def _file_identity(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    except (OSError, ValueError):
        return f"{path}|missing"


def content_identity(item: Any) -> str:
    """A string that changes when the raw item's content changes."""
    if isinstance(item, (AudioSegment, VideoFrame)):
        fields = {k: v for k, v in vars(item).items() if k != "path"}
        return f"{type(item).__name__}|{_file_identity(item.path)}|{json.dumps(fields, sort_keys=True)}"
    if isinstance(item, os.PathLike):
        return "file|" + _file_identity(os.fspath(item))
    if isinstance(item, str):
        # a manifest's file column holds absolute paths by now; text is text
        if os.path.isabs(item) and os.path.exists(item):
            return "file|" + _file_identity(item)
        return "text|" + hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "bytes|" + hashlib.sha256(bytes(item)).hexdigest()
    if isinstance(item, dict):
        if item.get("path") and not item.get("bytes") and "array" not in item:
            return "file|" + _file_identity(item["path"])
        h = hashlib.sha256()
        for k in sorted(item):
            v = item[k]
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
        return "dict|" + h.hexdigest()
    if isinstance(item, np.ndarray):
        return "array|" + hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()
    return "repr|" + hashlib.sha256(repr(item).encode()).hexdigest()


def item_key(record_id: str, item: Any) -> str:
    """The store key of one raw item of one record."""
    return hashlib.sha256(f"{record_id}\0{content_identity(item)}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class Lookup:
    """Embeddings for a list of keys: ``vectors[i]`` is valid where ``ok[i]``."""

    vectors: np.ndarray          # [n, dim] float32 (zeros where not ok)
    ok: np.ndarray               # [n] bool
    errors: dict[int, str]       # index -> reason, for items the encoder could not use
    missing: list[int]           # indices with no entry in the store


class EmbeddingStore:
    """Arrow shards of one encoder's outputs (one fingerprint)."""

    def __init__(self, root: str | Path, fingerprint: str, dim: int, meta: dict[str, Any] | None = None) -> None:
        self.dir = Path(root).expanduser() / fingerprint
        self.fingerprint = fingerprint
        self.dim = dim
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "store.json"
        if not meta_path.exists():
            _atomic_write_text(meta_path, json.dumps({"fingerprint": fingerprint, "dim": dim, **(meta or {})},
                                                     indent=2))
        self._index: dict[str, int] | None = None
        self._matrix = np.zeros((0, dim), np.float32)
        self._errors: list[str | None] = []

    # -- writing --------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Remove temporary folders left by a killed writer."""
        for tmp in self.dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def write_shard(self, keys: Sequence[str], ids: Sequence[str], vectors: np.ndarray,
                    errors: Sequence[str | None]) -> Path:
        """Write one shard atomically: ``vectors`` is ``[n, dim]``; rows with an error are ignored."""
        import datasets
        from datasets import Dataset, Features, List, Value

        datasets.disable_progress_bars()  # the extraction bar is the one that matters

        features = Features({
            "key": Value("string"),
            "id": Value("string"),
            "embedding": List(Value("float32"), length=self.dim),
            "error": Value("string"),
        })
        table = Dataset.from_dict(
            {"key": list(keys), "id": list(ids),
             "embedding": np.nan_to_num(np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)),
             "error": list(errors)},
            features=features,
        )
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f".tmp-{name}"
        table.save_to_disk(str(tmp))
        os.replace(tmp, self.dir / name)
        self._index = None
        return self.dir / name

    # -- reading --------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("shard-*") if p.is_dir())

    def _load(self) -> dict[str, int]:
        """Read every shard once: key -> row of the concatenated matrix (first write wins)."""
        if self._index is None:
            from datasets import load_from_disk

            matrices, errors, keys = [], [], []
            for shard in self.shards():
                table = load_from_disk(str(shard)).data  # pyarrow, memory-mapped
                column = table.column("embedding").combine_chunks()
                matrices.append(column.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim))
                errors.extend(table.column("error").to_pylist())
                keys.extend(table.column("key").to_pylist())
            self._matrix = np.concatenate(matrices) if matrices else np.zeros((0, self.dim), np.float32)
            self._errors = errors
            index: dict[str, int] = {}
            for row, key in enumerate(keys):
                index.setdefault(key, row)
            self._index = index
        return self._index

    def keys(self) -> set[str]:
        return set(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def lookup(self, keys: Sequence[str]) -> Lookup:
        """Gather embeddings (or errors) for ``keys`` in order."""
        index = self._load()
        rows = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
        present = rows >= 0
        vectors = np.zeros((len(keys), self.dim), dtype=np.float32)
        vectors[present] = self._matrix[rows[present]]
        errors = {i: self._errors[r] for i, r in enumerate(rows) if r >= 0 and self._errors[r] is not None}
        ok = present.copy()
        ok[list(errors)] = False
        vectors[~ok] = 0.0
        return Lookup(vectors, ok, errors, np.flatnonzero(~present).tolist())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def chunked(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
