"""The ``manifest`` source: rows of a CSV (with a header) or JSONL file, one column per modality."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from coembed.errors import RecipeError
from coembed.sources.base import BadRecord, Record, Source, SourceOptions, make_record, record_id, unique_ids


class ManifestOptions(SourceOptions):
    path: str = Field(description="CSV (with a header) or JSONL file")
    id_column: str = "id"
    group_column: str | None = Field(default="group", description="missing column -> each record is its own group")
    label_column: str | None = "label"
    root: str | None = Field(default=None, description="folder relative media paths resolve against "
                                                       "(default: the manifest's folder)")


def read_manifest_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV or JSONL manifest. Bytes that are not UTF-8 (a file name in
    another encoding) are kept as surrogate escapes, so the file they name is
    still found (and reported as a bad path name) instead of failing the read."""
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        with path.open(encoding="utf-8", errors="surrogateescape") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if line:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield {"__bad__": f"line {lineno}: invalid JSON ({exc.msg})", "__line__": lineno}
                        continue
                    yield row if isinstance(row, dict) else {"__bad__": f"line {lineno}: not an object",
                                                             "__line__": lineno}
    else:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
            yield from csv.DictReader(fh)


class ManifestSource(Source):
    """Rows of a CSV or JSONL file: id, group, label and one column per modality.

    A modality whose adapter takes files holds a path (relative to ``root``);
    a text modality holds the string itself. Empty cells mean "this record has
    no item of that modality" (fine: it just joins no pair of that type).
    """

    name = "manifest"
    Options = ManifestOptions
    options: ManifestOptions

    @property
    def path(self) -> Path:
        return self.context.resolve_path(self.options.path)

    def __iter__(self) -> Iterator[Record | BadRecord]:
        path = self.path
        if not path.is_file():
            raise RecipeError(f"data.path: manifest not found: {path}")
        root = self.context.resolve_path(self.options.root) if self.options.root else path.parent
        yield from records_from_rows(read_manifest_rows(path), self.options, self.columns, self.context.kinds, root)


def records_from_rows(rows: Iterable[dict[str, Any]], options: ManifestOptions, columns: dict[str, str],
                      kinds: dict[str, str], root: Path) -> Iterator[Record | BadRecord]:
    return unique_ids(_row_records(rows, options, columns, kinds, root))


def _row_records(rows: Iterable[dict[str, Any]], options: ManifestOptions, columns: dict[str, str],
                 kinds: dict[str, str], root: Path) -> Iterator[Record | BadRecord]:
    for index, row in enumerate(rows):
        if "__bad__" in row:
            yield BadRecord(f"row-{row['__line__']}", row["__bad__"])
            continue
        rid = record_id(row.get(options.id_column))
        if rid is None:
            yield BadRecord(f"row-{index + 1}", f"no value in id column {options.id_column!r}")
            continue
        items: dict[str, Any] = {}
        for modality, column in columns.items():
            value = row.get(column)
            if value is None or (isinstance(value, str) and value == ""):
                continue
            if kinds.get(modality) == "file" and isinstance(value, str):
                p = Path(value).expanduser()
                value = str(p if p.is_absolute() else root / p)
            items[modality] = value
        yield make_record(rid, items, row.get(options.group_column) if options.group_column else None,
                          row.get(options.label_column) if options.label_column else None)
