"""The ``esc50`` data source: the ESC-50 environmental sound set in its published layout.

::

    <path>/audio/<filename>.wav      2000 five-second clips
    <path>/meta/esc50.csv            filename, fold, target, category, esc10, src_file, take

Each clip is one record: id = the file name without suffix, group = its
``src_file`` (clips cut from one recording stay together), label = its
``category`` (e.g. ``dog``, ``chirping_birds``). ``folds`` picks some of the
five official folds (default: all); ``esc10`` keeps the ESC-10 subset. Used by
zero-shot classification (``eval.zero_shot`` / ``coembed eval zero-shot``)
and usable as any recipe's data source.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from pydantic import Field

from coembed.errors import RecipeError
from coembed.sources.base import BadRecord, Record, Source, SourceOptions, make_record, unique_ids

REQUIRED_COLUMNS = ("filename", "fold", "category")


class Esc50Options(SourceOptions):
    path: str = Field(description="the ESC-50 folder, holding audio/ and meta/esc50.csv")
    folds: list[int] | None = Field(default=None, description="official folds to read (1-5; default: all)")
    esc10: bool = Field(default=False, description="only the clips of the ESC-10 subset")
    modality: str = Field(default="audio", description="the recipe modality the clips are items of")
    meta: str = Field(default="meta/esc50.csv", description="the metadata file, relative to path")
    audio_dir: str = Field(default="audio", description="the folder of the clips, relative to path")

    def split_name(self) -> str | None:
        parts = ([f"folds {', '.join(map(str, self.folds))}"] if self.folds else []) + (["ESC-10"] if self.esc10 else [])
        return ", ".join(parts) or None


class Esc50Source(Source):
    """ESC-50 clips with their category as label."""

    name = "esc50"
    Options = Esc50Options
    options: Esc50Options

    @property
    def root(self) -> Path:
        return self.context.resolve_path(self.options.path)

    def __iter__(self) -> Iterator[Record | BadRecord]:
        o = self.options
        if o.modality not in self.context.modalities:
            raise RecipeError(f"data.modality: {o.modality!r} is not one of the modalities "
                              f"{sorted(self.context.modalities)}")
        meta = self.root / o.meta
        if not meta.is_file():
            raise RecipeError(f"data.path: {meta} not found; an ESC-50 folder holds {o.audio_dir}/ and {o.meta}")
        folds = set(o.folds) if o.folds else None
        seen_folds: set[int] = set()
        with meta.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise RecipeError(f"data.path: {meta} lacks the column(s) {', '.join(missing)}")
            for rec in unique_ids(self._clips(reader, meta, folds, seen_folds)):
                if isinstance(rec, Record):
                    self.counts["clips"] = self.counts.get("clips", 0) + 1
                yield rec
        if folds is not None and (absent := folds - seen_folds):
            raise RecipeError(f"data.folds: fold(s) {sorted(absent)} have no clips in {meta}")

    def _clips(self, reader: csv.DictReader, meta: Path, folds: set[int] | None,
               seen_folds: set[int]) -> Iterator[Record | BadRecord]:
        """The records of the metadata rows in the chosen folds; adds each fold met to ``seen_folds``."""
        o = self.options
        for line, row in enumerate(reader, 2):
            # a short row's missing cells are None
            filename = row["filename"] or ""
            rid = Path(filename).stem or f"line-{line}"
            try:
                fold = int(row["fold"])
            except (TypeError, ValueError):
                yield BadRecord(rid, f"{meta.name} line {line}: fold {row['fold']!r} is not a number", o.modality)
                continue
            if (folds is not None and fold not in folds) or (o.esc10 and row.get("esc10") != "True"):
                continue
            seen_folds.add(fold)
            path = self.root / o.audio_dir / filename
            if not path.is_file():
                yield BadRecord(rid, f"missing file: {path}", o.modality)
                continue
            yield make_record(rid, {o.modality: str(path)}, row.get("src_file"), (row["category"] or "").strip())
