"""Hugging Face ``datasets`` as a source of paired records.

The ``hf_dataset`` source opens a data set with ``datasets.load_from_disk``
(``path``) or ``datasets.load_dataset`` (``name``, with ``config``, ``dataset_split``,
``data_files``, ...) and maps columns onto the recipe's modalities. Image and
Audio features are read undecoded (``{"bytes", "path"}``) and decoded by
:mod:`coembed.media` in the extraction workers, with its pixel limit, any mode
to RGB and any rate or channel count to what the adapter needs (and with no
need for the decoders ``datasets`` itself would call).

Media cells are not copied into the records: each record holds a
:class:`DatasetCell`, a reference to one cell of the memory-mapped table, so a
data set far larger than memory can be read, records stay cheap to pickle to
DataLoader workers, and the store keys a cell by the data set's fingerprint,
column and row instead of hashing its bytes. Text columns are read as strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow.compute as pc
from pydantic import Field, model_validator

from coembed.errors import RecipeError
from coembed.layout import is_repo_id, looks_like_path
from coembed.media import MediaRef
from coembed.sources.base import BadRecord, Record, Source, SourceOptions, make_record, record_id, unique_ids

log = logging.getLogger(__name__)


class HFDatasetOptions(SourceOptions):
    path: str | None = Field(default=None, description="folder written by Dataset.save_to_disk")
    name: str | None = Field(default=None, description="datasets.load_dataset path: a Hub id, a local folder, "
                                                       "or a builder such as parquet / csv / imagefolder")
    config: str | None = Field(default=None, description="configuration name for load_dataset")
    dataset_split: str | None = Field(default="train", description="the data set's split to read (also picks one "
                                                                   "of a saved DatasetDict); data.split is coembed's "
                                                                   "own train/validation split")
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    data_dir: str | None = None
    revision: str | None = None
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="modality -> column (default: each modality's recipe column)")
    id_column: str | None = Field(default=None, description="default: the row number")
    group_column: str | None = Field(default=None, description="default: each record is its own group")
    label_column: str | None = Field(default=None, description="ClassLabel values become their names")

    def location(self) -> str | None:
        return self.path or self.name

    def split_name(self) -> str | None:
        return self.dataset_split

    def hub_dataset(self) -> str | None:
        """The Hub data set this reads, when ``name`` is a Hub id (not a builder, not a local folder)."""
        name = self.name
        return name if name and "/" in name and is_repo_id(name) and not looks_like_path(name) else None

    @model_validator(mode="after")
    def _one_origin(self) -> "HFDatasetOptions":
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of path (a saved data set) or name (for datasets.load_dataset)")
        return self


@dataclass(frozen=True, eq=False)
class DatasetCell(MediaRef):
    """One cell of a ``datasets.Dataset`` column, fetched (undecoded) where it is decoded."""

    table: Any = field(repr=False)  # a one-column datasets.Dataset, memory-mapped; Image/Audio undecoded
    row: int
    column: str
    origin: str  # the data set's fingerprint

    def fetch(self) -> Any:
        return self.table[self.row][self.column]

    def identity(self) -> str:
        return f"dataset|{self.origin}|{self.column}|{self.row}"


class HFDatasetSource(Source):
    """Rows of a Hugging Face data set; one column per modality."""

    name = "hf_dataset"
    Options = HFDatasetOptions
    options: HFDatasetOptions

    def _open(self) -> Any:
        import datasets  # datasets takes a second or more to import: only a run that reads one pays for it

        o = self.options
        if o.path is not None:
            folder = self.context.resolve_path(o.path)
            if not folder.exists():
                raise RecipeError(f"data.path: saved data set not found: {folder}")
            ds = datasets.load_from_disk(str(folder))
            origin = f"load_from_disk {folder}"
        else:
            assert o.name is not None
            local = self.context.resolve_path(o.name)
            name = str(local) if local.exists() else o.name
            origin = f"load_dataset {name}"
            try:
                ds = datasets.load_dataset(name, o.config, split=o.dataset_split, data_files=o.data_files,
                                           data_dir=o.data_dir, revision=o.revision)
            except Exception as exc:  # not found, offline, bad config: say which and why
                raise RecipeError(f"data.name: datasets.load_dataset({name!r}) failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if o.dataset_split not in ds:
                raise RecipeError(f"data.dataset_split: {origin} has splits {sorted(ds)}; got {o.dataset_split!r}")
            ds = ds[o.dataset_split]
        if not isinstance(ds, datasets.Dataset):
            raise RecipeError(f"{origin} gave a {type(ds).__name__}; streaming data sets are not supported")
        return ds

    def _columns(self, ds: Any) -> dict[str, str]:
        """modality -> column that exists in ``ds``; an explicit mapping to a missing column is an error."""
        explicit = self.options.columns
        unknown = sorted(set(explicit) - set(self.context.modalities))
        if unknown:
            raise RecipeError(f"data.columns: {unknown} are not modalities of the recipe "
                              f"({sorted(self.context.modalities)})")
        mapping = {m: explicit.get(m, col) for m, col in self.columns.items()}
        out = {}
        for modality, column in mapping.items():
            if column in ds.column_names:
                out[modality] = column
            elif modality in explicit:
                raise RecipeError(f"data.columns.{modality}: no column {column!r} in the data set "
                                  f"(columns: {ds.column_names})")
            else:
                log.info("data set has no column %r: modality %s gets no items from it", column, modality)
        for key in ("id_column", "group_column", "label_column"):
            column = getattr(self.options, key)
            if column is not None and column not in ds.column_names:
                raise RecipeError(f"data.{key}: no column {column!r} in the data set (columns: {ds.column_names})")
        return out

    def __iter__(self) -> Iterator[Record | BadRecord]:
        import datasets  # see _open

        o = self.options
        ds = self._open()
        columns = self._columns(ds)
        kinds = self.context.kinds
        # the store keys cells by origin: a data set without a fingerprint is named by its options
        origin = str(getattr(ds, "_fingerprint", None)
                     or f"Hugging Face data set {o.path or o.name}" + (f" [{o.dataset_split}]" if o.dataset_split else ""))
        for column in set(columns.values()):
            feature = ds.features[column]
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
            elif isinstance(feature, datasets.Audio):
                ds = ds.cast_column(column, datasets.Audio(decode=False))
        arrow = ds.with_format("arrow")
        n = len(ds)
        self.counts["rows"] = n

        def values(column: str | None) -> list[Any] | None:
            return None if column is None else arrow[column].to_pylist()

        ids, groups, labels = values(o.id_column), values(o.group_column), values(o.label_column)
        if labels is not None and isinstance(ds.features[o.label_column], datasets.ClassLabel):
            names = ds.features[o.label_column]
            labels = [None if v is None else names.int2str(v) for v in labels]
        per_modality: dict[str, list[Any]] = {}
        for modality, column in columns.items():
            if kinds.get(modality) == "text":
                per_modality[modality] = values(column) or []
            else:  # media: a reference per present cell, fetched and decoded in the extraction workers
                one = ds.select_columns([column])
                nulls = pc.is_null(arrow[column]).to_numpy(zero_copy_only=False)
                per_modality[modality] = [None if null else DatasetCell(one, row, column, origin)
                                          for row, null in enumerate(nulls)]

        def records() -> Iterator[Record | BadRecord]:
            for row in range(n):
                rid = record_id(ids[row]) if ids is not None else str(row)
                if rid is None:
                    yield BadRecord(f"row-{row}", f"no value in id column {o.id_column!r}")
                    continue
                items = {m: v[row] for m, v in per_modality.items() if v[row] is not None and v[row] != ""}
                yield make_record(rid, items, groups[row] if groups is not None else None,
                                  labels[row] if labels is not None else None)

        yield from unique_ids(records())
