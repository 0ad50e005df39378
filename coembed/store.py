"""The embedding store: encoder outputs cached as Arrow files, keyed by item and encoder.

Layout::

    <root>/<fingerprint>/
        store.json                   adapter key, config, dim (written once)
        shard-<time>-<uid>.arrow     one Arrow IPC file per shard, columns
                                     key, id, embedding (float32[dim]), error (null when good),
                                     notes (JSON measurements of the item, e.g. its audio level)

``root`` is a local folder or any URI that :mod:`pyarrow.fs` opens (``file://``,
``s3://``, ``gs://``, ``hdfs://``, ...), so the workers of a cluster can fill one
store. Shards are written with pyarrow directly: a shard is written to a
temporary file ``.tmp-<host>-<pid>-<name>``, flushed to disk and renamed into
place, so a reader sees a shard whole or not at all; a killed run leaves at
most a temporary file, which the next writer removes once its process is gone.
A shard that cannot be read is skipped with a warning (its items are simply
encoded again). When two shards hold the same key the older shard wins.
Shards written by coembed 0.1 (``shard-<time>-<uid>/`` folders written by
``datasets``) are read as they are.

Reading is lean at any size. Opening a store reads only the keys (and the rare
errors) of its shards into a sorted index: a million keys cost some tens of
megabytes and a second or two. Vectors are read only when asked for
(:meth:`Lookup.gather`), shard by shard, memory-mapped on a local disk and
unmapped once copied out, so the one copy a caller holds is the only one.

The key of an item is derived from the record id and the item's content
identity (a file's path, size and mtime, a string's hash, or a
:class:`~coembed.media.MediaRef`'s identity): change a file and it is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image

from coembed.bad_items import BadItemRow, rows_of
from coembed.layout import is_uri
from coembed.media import AudioSegment, MediaRef, VideoFrame, safe_text
from coembed.record import dumps

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".arrow"
#: The file holding the store's description.
STORE_META = "store.json"


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


def open_root(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a store root: a local folder, or a URI that :mod:`pyarrow.fs` opens."""
    text = os.fspath(root)
    if is_uri(text):
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


@dataclass
class Lookup:
    """What the store holds for a list of keys: item ``i`` is usable where ``ok[i]``.

    Vectors are read from the store only when asked for: :meth:`gather` reads
    the rows of some items, :attr:`vectors` those of all (zeros where not ok).
    """

    rows: np.ndarray             # [n] int64: the store row of each key, -1 where missing
    ok: np.ndarray               # [n] bool
    errors: dict[int, str]       # index -> reason, for items the encoder could not use
    missing: list[int]           # indices with no entry in the store
    notes: dict[int, dict[str, float]] = field(default_factory=dict)  # index -> measurements of the item
    flags: dict[int, str] = field(default_factory=dict)  # index -> why a kept item is suspect
    store: EmbeddingStore | None = field(default=None, repr=False)
    dim: int = 0

    def gather(self, positions: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``[len(positions), dim]`` float32: the vectors of those items (each must be ok), in that order,
        into ``out`` when given."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and not bool(self.ok[positions].all()):
            raise ValueError("gather() of items that are not usable (see Lookup.ok)")
        if self.store is None:
            return np.zeros((len(positions), self.dim), dtype=np.float32) if out is None else out
        return self.store.read_rows(self.rows[positions], out=out)

    @property
    def vectors(self) -> np.ndarray:
        """``[n, dim]`` float32 vectors of every item, zeros where not ok (read on each call: prefer :meth:`gather`)."""
        out = np.zeros((len(self.rows), self.dim), dtype=np.float32)
        usable = np.flatnonzero(self.ok)
        if usable.size:
            out[usable] = self.gather(usable)
        return out

    def bad_rows(self, ids: Sequence[str], modality: str) -> list[BadItemRow]:
        """A ``bad_items.jsonl`` row for every item (``ids[i]`` is item ``i``) that failed or is not stored."""
        return (rows_of(ids, modality, self.errors)
                + rows_of(ids, modality, {i: "missing from the store" for i in self.missing}))

    def flagged_rows(self, ids: Sequence[str], modality: str) -> list[BadItemRow]:
        """A row for every item kept although suspect (silent audio kept, a short clip padded or repeated)."""
        return rows_of(ids, modality, self.flags, flagged=True)


def key_array(keys: Sequence[str]) -> np.ndarray:
    """Keys as a numpy bytes array (the index's sort order), without a Python object per key when ASCII."""
    if not len(keys):
        return np.zeros(0, dtype="S1")
    try:
        return np.array(keys, dtype=bytes)  # coembed's own keys are hex digests
    except UnicodeEncodeError:
        return np.array([k.encode("utf-8", "surrogatepass") for k in keys], dtype=bytes)


def _column_keys(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A string column of keys as a numpy bytes array, without a Python string per key when they share a length."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.binary()) if pa.types.is_string(array.type) else array
    if len(array) and array.null_count == 0 and array.offset == 0:
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1)
        width = int(offsets[1] - offsets[0])
        if width > 0 and int(offsets[-1] - offsets[0]) == width * len(array):
            data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
            return data.view(f"S{width}").copy()
    return np.array(array.to_pylist(), dtype=bytes) if len(array) else np.zeros(0, dtype="S1")


@dataclass
class _Index:
    """The keys of every readable shard, sorted, with where each one's row lies."""

    shards: list[str]                  # shard paths, in the order read (oldest first)
    sizes: list[int]                   # rows per shard
    keys: np.ndarray                   # the key (bytes) of each global row, shard after shard
    order: np.ndarray                  # int64: the global rows sorted by key, equal keys oldest first
    unique: int                        # distinct keys
    shard_of_row: np.ndarray           # int32 per global row
    local_row: np.ndarray              # int32 per global row: the row inside its shard
    errors: dict[int, str]             # global row -> reason, for the rows that have one
    has_notes: np.ndarray              # bool per global row


class EmbeddingStore:
    """Arrow shards of one encoder's outputs (one fingerprint)."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: str, dim: int,
                 meta: dict[str, Any] | None = None) -> None:
        self.fs, base = open_root(root)
        self.path = f"{base}/{fingerprint}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        #: the store's folder (a local path; a POSIX path inside its filesystem otherwise)
        self.dir: Path | PurePosixPath = Path(self.path) if self.local else PurePosixPath(self.path)
        self.fingerprint = fingerprint
        self.dim = dim
        self.fs.create_dir(self.path, recursive=True)
        meta_path = f"{self.path}/{STORE_META}"
        if self.fs.get_file_info(meta_path).type == pafs.FileType.NotFound:
            self._write_bytes(meta_path, dumps({"fingerprint": fingerprint, "dim": dim, **(meta or {})},
                                               indent=2).encode())
        self._index: _Index | None = None
        #: per shard read or written: (path, keys, errors {local row: reason}, has_notes)
        self._parts: list[tuple[str, np.ndarray, dict[int, str], np.ndarray]] | None = None

    # -- files ----------------------------------------------------------------------
    def _entries(self) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    def _write_bytes(self, path: str, data: bytes) -> None:
        tmp = f"{self.path}/.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    # -- writing --------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Remove temporary files whose writer is gone (killed, crashed).

        Files of a writer still running on this host are left alone, so two
        runs sharing a store do not break each other; those of another host
        are removed once a day old.
        """
        for info in self._entries():
            if info.base_name.startswith(".tmp-") and _writer_gone(info):
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)

    def write_shard(self, keys: Sequence[str], ids: Sequence[str], vectors: np.ndarray,
                    errors: Sequence[str | None], notes: Sequence[dict[str, float] | None] | None = None) -> Path | str:
        """Write one shard atomically: ``vectors`` is ``[n, dim]``; rows with an error are ignored.

        ``notes`` holds optional per-item measurements (JSON-serialisable dicts).
        Returns the shard's path.
        """
        n = len(keys)
        matrix = np.ascontiguousarray(np.nan_to_num(np.asarray(vectors, dtype=np.float32).reshape(n, self.dim)))
        errors = [None if e is None else safe_text(e) for e in errors]
        note_text = [dumps(x) if x else None for x in (notes or [None] * n)]
        table = pa.table({
            "key": pa.array(list(keys), pa.string()),
            "id": pa.array([safe_text(str(i)) for i in ids], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), self.dim),
            "error": pa.array(errors, pa.string()),
            "notes": pa.array(note_text, pa.string()),
        })
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
        final = f"{self.path}/{name}"
        tmp = f"{self.path}/.tmp-{_host()}-{os.getpid()}-{name}"
        try:
            _write_table(self.fs, tmp, table, durable=self.local)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise
        if self.local:
            _fsync_dir(self.path)
        if self._parts is not None:  # what was read plus this shard: no need to read every shard again
            self._parts.append((final, key_array(list(keys)),
                                {i: e for i, e in enumerate(errors) if e is not None},
                                np.array([t is not None for t in note_text], dtype=bool)))
            self._index = None
        return Path(final) if self.local else final

    # -- reading --------------------------------------------------------------------
    def shards(self) -> list[Path | str]:
        """The shards, oldest first: ``.arrow`` files, and the folders of stores written by coembed 0.1."""
        found = sorted(info.path for info in self._entries() if info.base_name.startswith("shard-")
                       and (info.base_name.endswith(SHARD_SUFFIX) or info.type == pafs.FileType.Directory))
        return [Path(p) for p in found] if self.local else found

    @contextmanager
    def _open(self, shard: str) -> Iterator[pa.Table]:
        """A shard's table: memory-mapped on a local disk (unmapped when the block ends), read whole elsewhere."""
        if self.fs.get_file_info(shard).type == pafs.FileType.Directory:  # a coembed 0.1 (datasets) shard
            files = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(shard))
                           if i.path.endswith(SHARD_SUFFIX))
            opened = [self._source(f) for f in files]
            try:
                yield pa.concat_tables([pa.ipc.open_stream(src).read_all() for src in opened])
            finally:
                for src in opened:
                    src.close()
        else:
            source = self._source(shard)
            try:
                yield pa.ipc.open_file(source).read_all()
            finally:
                source.close()

    def _source(self, path: str) -> pa.NativeFile:
        return pa.memory_map(path) if self.local else self.fs.open_input_file(path)

    def _read_parts(self) -> list[tuple[str, np.ndarray, dict[int, str], np.ndarray]]:
        if self._parts is None:
            parts = []
            for shard in self.shards():
                path = str(shard)
                try:
                    with self._open(path) as table:
                        keys = _column_keys(table.column("key"))
                        error = table.column("error")
                        bad = np.flatnonzero(pc.is_valid(error).to_numpy(zero_copy_only=False))
                        errors = {int(i): str(error[int(i)].as_py()) for i in bad}
                        has_notes = (pc.is_valid(table.column("notes")).to_numpy(zero_copy_only=False).copy()
                                     if "notes" in table.column_names else np.zeros(len(keys), dtype=bool))
                        if table.column("embedding").type.list_size != self.dim:
                            raise ValueError(f"vectors of {table.column('embedding').type.list_size} values, "
                                             f"not {self.dim}")
                except Exception as exc:  # a damaged shard costs its items a new encoding, not the run
                    log.warning("skipping unreadable store shard %s (%s: %s); its items will be encoded again",
                                path, type(exc).__name__, exc)
                    continue
                parts.append((path, keys, errors, has_notes))
            self._parts = parts
        return self._parts

    def _load(self) -> _Index:
        """The index of every readable shard, built once (and again only after a write)."""
        if self._index is None:
            parts = self._read_parts()
            sizes = [len(keys) for _, keys, _, _ in parts]
            all_keys = np.concatenate([keys for _, keys, _, _ in parts]) if parts else np.zeros(0, dtype="S1")
            starts = np.cumsum([0, *sizes])
            # the parts' keys become views of the one array: every key is held once
            parts[:] = [(path, all_keys[starts[i]:starts[i + 1]], errs, notes)
                        for i, (path, _, errs, notes) in enumerate(parts)]
            order = np.argsort(all_keys, kind="stable")  # equal keys keep shard order: the oldest comes first
            ordered = all_keys[order]
            unique = int(len(ordered) and 1 + np.count_nonzero(ordered[1:] != ordered[:-1]))
            del ordered
            errors = {int(starts[s]) + i: e for s, (_, _, errs, _) in enumerate(parts) for i, e in errs.items()}
            self._index = _Index(
                shards=[path for path, _, _, _ in parts], sizes=sizes, keys=all_keys, order=order, unique=unique,
                shard_of_row=np.repeat(np.arange(len(parts), dtype=np.int32), sizes),
                local_row=np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if sizes
                else np.zeros(0, dtype=np.int32),
                errors=errors,
                has_notes=np.concatenate([h for _, _, _, h in parts]) if parts else np.zeros(0, dtype=bool))
        return self._index

    def keys(self) -> set[str]:
        return {k.decode("utf-8", "surrogatepass") for k in self._load().keys.tolist()}

    def __len__(self) -> int:
        return self._load().unique

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The store row of each key (``-1`` where the store has none), vectorised."""
        index = self._load()
        wanted = key_array(keys)
        if not len(index.keys) or not len(wanted):
            return np.full(len(wanted), -1, dtype=np.int64)
        # the leftmost match in key order is the oldest shard's row (the sort is stable)
        pos = np.clip(np.searchsorted(index.keys, wanted, sorter=index.order), 0, len(index.keys) - 1)
        rows = index.order[pos]
        return np.where(index.keys[rows] == wanted, rows, -1).astype(np.int64)

    def lookup(self, keys: Sequence[str]) -> Lookup:
        """What the store holds for ``keys``, in order: rows, errors, measurements (vectors on demand)."""
        index = self._load()
        rows = self.rows_of(keys)
        present = rows >= 0
        errors = {int(i): index.errors[int(r)] for i, r in zip(np.flatnonzero(present), rows[present])
                  if int(r) in index.errors}
        ok = present.copy()
        ok[list(errors)] = False
        return Lookup(rows, ok, errors, np.flatnonzero(~present).tolist(), self._notes(rows), store=self,
                      dim=self.dim)

    def _by_shard(self, rows: np.ndarray) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(shard, positions in rows, rows inside that shard)`` for every shard that ``rows`` (all >= 0) touch."""
        index = self._load()
        shard_of = index.shard_of_row[rows]
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for positions in np.split(order, bounds) if len(order) else []:
            yield index.shards[int(shard_of[positions[0]])], positions, index.local_row[rows[positions]]

    def _notes(self, rows: np.ndarray) -> dict[int, dict[str, float]]:
        """Position -> measurements, for the rows (``-1``: none) that have any."""
        index = self._load()
        wanted = np.flatnonzero(rows >= 0)
        wanted = wanted[index.has_notes[rows[wanted]]]
        notes: dict[int, dict[str, float]] = {}
        for shard, positions, local in self._by_shard(rows[wanted]):
            with self._open(shard) as table:
                texts = table.column("notes").take(pa.array(local)).to_pylist()
            notes.update({int(wanted[p]): json.loads(t) for p, t in zip(positions, texts)})
        return dict(sorted(notes.items()))

    def read_rows(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The vectors of store ``rows`` (all present), ``[len(rows), dim]`` float32, into ``out`` when given.

        Shard by shard: each is mapped, its rows copied out, and unmapped, so no
        more than one shard's pages are held beside ``out``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32) if out is None else out
        for shard, positions, local in self._by_shard(rows):
            with self._open(shard) as table:
                column = table.column("embedding")
                start = 0
                for chunk in column.chunks:
                    matrix = chunk.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
                    inside = (local >= start) & (local < start + len(chunk))
                    out[positions[inside]] = matrix[local[inside] - start]
                    start += len(chunk)
                del column, matrix
        return out

    def shard_keys(self, shard: Path | str) -> list[str]:
        """Every key one shard holds, in its order (duplicates of other shards included)."""
        with self._open(str(shard)) as table:
            return table.column("key").to_pylist()


def _write_table(fs: pafs.FileSystem, path: str, table: pa.Table, durable: bool) -> None:
    """Write ``table`` as an Arrow IPC file; ``durable``: flushed to the disk before it returns (local files)."""
    if durable:
        with open(path, "wb") as fh:
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        with fs.open_output_stream(path) as out, pa.ipc.new_file(out, table.schema) as writer:
            writer.write_table(table)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _writer_gone(info: pafs.FileInfo) -> bool:
    """Whether the process that writes the temporary file (or folder) ``info`` has ended."""
    parts = info.base_name.split("-", 3)  # .tmp, host, pid, shard name
    if len(parts) != 4 or not parts[2].isdigit():
        return True
    if parts[1] != _host():
        return info.mtime is not None and time.time() - info.mtime.timestamp() > 86_400
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _fsync_dir(folder: str) -> None:
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
