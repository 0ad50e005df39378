"""The embedding store: encoder outputs cached as Arrow shards, keyed by item and encoder.

Layout::

    <root>/<fingerprint>/
        store.json                 adapter key, config, dim (written once)
        shard-<time>-<uid>/        one ``datasets`` Arrow table per shard, columns
                                   key, id, embedding (float32[dim]), error (null when good),
                                   notes (JSON measurements of the item, e.g. its audio level)

A shard is written to a temporary folder ``.tmp-<host>-<pid>-<name>``, flushed
to disk and renamed into place, so a reader sees a shard whole or not at all;
a killed run leaves at most a temporary folder, which the next writer removes
once its process is gone. A shard that cannot be read is skipped with a
warning (its items are simply encoded again). When two shards hold the same
key the older shard wins. The key of an item is derived from the record id and
the item's content identity (a file's path, size and mtime, a string's hash,
or a :class:`~coembed.media.MediaRef`'s identity): change a file and it is
encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from coembed.bad_items import BadItemRow, rows_of
from coembed.media import AudioSegment, MediaRef, VideoFrame, safe_text
from coembed.record import write_json

log = logging.getLogger(__name__)

def _stat_identity(path: str) -> str | None:
    """A file's path, size and mtime; ``None`` when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _file_identity(path: str) -> str:
    return _stat_identity(path) or f"{path}|missing"


def content_identity(item: Any) -> str:
    """A string that changes when the raw item's content changes."""
    if isinstance(item, MediaRef):
        return "ref|" + item.identity()
    if isinstance(item, (AudioSegment, VideoFrame)):
        fields = {k: v for k, v in vars(item).items() if k != "path"}
        return f"{type(item).__name__}|{_file_identity(item.path)}|{json.dumps(fields, sort_keys=True)}"
    if isinstance(item, os.PathLike):
        return "file|" + _file_identity(os.fspath(item))
    if isinstance(item, str):
        # a manifest's file column holds absolute paths by now; text is text
        if os.path.isabs(item) and (identity := _stat_identity(item)) is not None:
            return "file|" + identity
        return "text|" + hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "bytes|" + hashlib.sha256(bytes(item)).hexdigest()
    if isinstance(item, dict):
        if item.get("path") and not item.get("bytes") and "array" not in item:
            return "file|" + _file_identity(item["path"])
        h = hashlib.sha256()
        for k in sorted(item):
            v = item[k]
            h.update(str(k).encode())
            if isinstance(v, np.ndarray):
                h.update(np.ascontiguousarray(v).tobytes())
            elif isinstance(v, (bytes, bytearray, memoryview)):
                h.update(v)
            else:
                h.update(repr(v).encode("utf-8", "surrogatepass"))
        return "dict|" + h.hexdigest()
    if isinstance(item, np.ndarray):
        return "array|" + hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()
    if isinstance(item, Image.Image):
        h = hashlib.sha256(f"{item.mode}|{item.size}".encode())
        h.update(item.tobytes())
        return "image|" + h.hexdigest()
    return "repr|" + hashlib.sha256(repr(item).encode("utf-8", "surrogatepass")).hexdigest()


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
    notes: dict[int, dict[str, float]] = field(default_factory=dict)  # index -> measurements of the item
    flags: dict[int, str] = field(default_factory=dict)  # index -> why a kept item is suspect

    def bad_rows(self, ids: Sequence[str], modality: str) -> list[BadItemRow]:
        """A ``bad_items.jsonl`` row for every item (``ids[i]`` is item ``i``) that failed or is not stored."""
        return (rows_of(ids, modality, self.errors)
                + rows_of(ids, modality, {i: "missing from the store" for i in self.missing}))

    def flagged_rows(self, ids: Sequence[str], modality: str) -> list[BadItemRow]:
        """A row for every item kept although suspect (silent audio kept by ``data.silent_audio: keep``)."""
        return rows_of(ids, modality, self.flags, flagged=True)


class EmbeddingStore:
    """Arrow shards of one encoder's outputs (one fingerprint)."""

    def __init__(self, root: str | Path, fingerprint: str, dim: int, meta: dict[str, Any] | None = None) -> None:
        self.dir = Path(root).expanduser() / fingerprint
        self.fingerprint = fingerprint
        self.dim = dim
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "store.json"
        if not meta_path.exists():
            write_json(meta_path, {"fingerprint": fingerprint, "dim": dim, **(meta or {})})
        # what the shards hold, read on first use: key -> row, and per row its embedding, error and notes
        self._index: dict[str, int] | None = None
        self._parts: list[np.ndarray] = []  # the rows' embeddings, one block per shard until joined
        self._errors: list[str | None] = []
        self._notes: list[str | None] = []

    # -- writing --------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Remove temporary folders whose writer is gone (killed, crashed).

        Folders of a writer still running on this host are left alone, so two
        runs sharing a cache do not break each other; those of another host
        are removed once a day old.
        """
        for tmp in self.dir.glob(".tmp-*"):
            if _writer_gone(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def write_shard(self, keys: Sequence[str], ids: Sequence[str], vectors: np.ndarray,
                    errors: Sequence[str | None], notes: Sequence[dict[str, float] | None] | None = None) -> Path:
        """Write one shard atomically: ``vectors`` is ``[n, dim]``; rows with an error are ignored.

        ``notes`` holds optional per-item measurements (JSON-serialisable dicts).
        """
        import datasets  # datasets takes a second or more to import: only work that writes a shard pays for it
        from datasets import Dataset, Features, List, Value

        datasets.disable_progress_bars()  # the extraction bar is the one that matters

        features = Features({
            "key": Value("string"),
            "id": Value("string"),
            "embedding": List(Value("float32"), length=self.dim),
            "error": Value("string"),
            "notes": Value("string"),
        })
        columns = {"key": list(keys), "id": [safe_text(str(i)) for i in ids],
                   "embedding": np.nan_to_num(np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)),
                   "error": [None if e is None else safe_text(e) for e in errors],
                   "notes": [json.dumps(n) if n else None for n in (notes or [None] * len(keys))]}
        table = Dataset.from_dict(columns, features=features)
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f".tmp-{_host()}-{os.getpid()}-{name}"
        try:
            table.save_to_disk(str(tmp))
            _fsync_tree(tmp)
            os.replace(tmp, self.dir / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.dir)
        if self._index is not None:  # the shards already read plus this one: no need to read them all again
            self._add(columns["key"], columns["embedding"], columns["error"], columns["notes"])
        return self.dir / name

    # -- reading --------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("shard-*") if p.is_dir())

    def _load(self) -> dict[str, int]:
        """Read every shard once: key -> row of the concatenated matrix (first write wins)."""
        if self._index is None:
            from datasets import load_from_disk  # see write_shard

            self._index, self._parts, self._errors, self._notes = {}, [], [], []
            for shard in self.shards():
                try:
                    table = load_from_disk(str(shard)).data  # pyarrow, memory-mapped
                    column = table.column("embedding").combine_chunks()
                    matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
                except Exception as exc:  # a damaged shard costs its items a new encoding, not the run
                    log.warning("skipping unreadable store shard %s (%s: %s); its items will be encoded again",
                                shard, type(exc).__name__, exc)
                    continue
                self._add(table.column("key").to_pylist(), matrix, table.column("error").to_pylist(),
                          table.column("notes").to_pylist() if "notes" in table.column_names
                          else [None] * table.num_rows)
        return self._index

    def _add(self, keys: list[str], matrix: np.ndarray, errors: list[str | None], notes: list[str | None]) -> None:
        """Append one shard's rows to what was read; a key already present keeps its older row."""
        assert self._index is not None
        for row, key in enumerate(keys, len(self._errors)):
            self._index.setdefault(key, row)
        self._parts.append(matrix)
        self._errors.extend(errors)
        self._notes.extend(notes)

    def _matrix(self) -> np.ndarray:
        """The embeddings of every row read, as one ``[rows, dim]`` array."""
        if len(self._parts) != 1:
            self._parts = [np.concatenate(self._parts) if self._parts else np.zeros((0, self.dim), np.float32)]
        return self._parts[0]

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
        vectors[present] = self._matrix()[rows[present]]
        errors = {i: self._errors[r] for i, r in enumerate(rows) if r >= 0 and self._errors[r] is not None}
        notes = {i: json.loads(self._notes[r]) for i, r in enumerate(rows) if r >= 0 and self._notes[r]}
        ok = present.copy()
        ok[list(errors)] = False
        vectors[~ok] = 0.0
        return Lookup(vectors, ok, errors, np.flatnonzero(~present).tolist(), notes)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _writer_gone(tmp: Path) -> bool:
    """Whether the process that writes the temporary folder ``tmp`` has ended."""
    parts = tmp.name.split("-", 3)  # .tmp, host, pid, shard name
    if len(parts) != 4 or not parts[2].isdigit():
        return True
    if parts[1] != _host():
        try:
            return time.time() - tmp.stat().st_mtime > 86_400
        except OSError:
            return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _fsync_tree(folder: Path) -> None:
    """Flush a freshly written folder's files to disk (a rename must never expose unwritten data)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
