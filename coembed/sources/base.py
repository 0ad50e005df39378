"""What a data source is: records, bad records, the context a source reads in, the source registry.

A source yields :class:`Record` objects ``{id, group, label, items}`` where
``items`` maps a modality name to a raw item (a path, a string, an
:class:`~coembed.media.AudioSegment`, ...), and :class:`BadRecord` objects for
inputs it could not turn into a record. Sources register through the
entry-point group ``coembed.sources`` (:mod:`coembed.plugins`), coembed's own
as any plugin's; each declares its options as a pydantic model, so a recipe
is checked before any work.

A source gets what it needs to read in a :class:`SourceContext` (the
modalities and their data columns, how each modality's adapter takes input,
the folder relative paths resolve against, the seed, the cache folder), never
a whole recipe: a trained model's evaluation reads sources the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from coembed.bad_items import BadItemRow, bad_row
from coembed.errors import RecipeError
from coembed.media import safe_text
from coembed.plugins import PluginGroup

ENTRY_POINT_GROUP = "coembed.sources"


@dataclass(slots=True)
class Record:
    """One paired example: the raw items of several modalities that belong together.

    Slotted: a million records cost their strings and item dicts, no attribute dicts besides.
    """

    id: str
    group: str
    items: dict[str, Any]
    label: str | None = None


@dataclass(slots=True)
class BadRecord:
    """An input that could not become a record, with the reason."""

    id: str
    reason: str
    modality: str | None = None

    def row(self) -> BadItemRow:
        """Its line of ``bad_items.jsonl``."""
        return bad_row(self.id, self.modality, self.reason)


class SourceOptions(BaseModel):
    """Options of a source; each source subclasses this with its own keys (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    def location(self) -> str | None:
        """Where the source reads, as the recipe says it (for reports and model cards)."""
        value = getattr(self, "path", None)
        return str(value) if value else None

    def split_name(self) -> str | None:
        """The part of the data set read (a named split, folds), or ``None`` for all of it."""
        return None


@dataclass(frozen=True)
class SourceContext:
    """What a source needs to read records for a recipe or a model."""

    #: modality -> the data column holding it (default: the modality's name)
    columns: dict[str, str]
    #: modality -> how its adapter takes raw items: ``"file"`` (paths, resolved) or ``"text"`` (strings)
    kinds: dict[str, str]
    #: the folder relative paths resolve against
    base_dir: Path = Path(".")
    seed: int = 0
    #: a folder for what a source may cache between runs (the embedding store's root)
    cache_dir: Path | None = None
    #: show progress bars for slow stages of reading
    progress: bool = False

    @property
    def modalities(self) -> list[str]:
        return list(self.columns)

    def resolve_path(self, value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


class Source(ABC):
    """A reader of paired records. Subclasses set ``name`` and ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[SourceOptions]] = SourceOptions

    def __init__(self, options: SourceOptions, context: SourceContext) -> None:
        self.options = options
        self.context = context
        #: what the source read, for the run summary (e.g. ``{"videos": 1200}``); filled while iterating
        self.counts: dict[str, int] = {}

    @property
    def columns(self) -> dict[str, str]:
        """modality -> column name in the data."""
        return self.context.columns

    @abstractmethod
    def __iter__(self) -> Iterator[Record | BadRecord]:
        """Yield records (and bad records) in a deterministic order."""


SOURCES: PluginGroup[Source] = PluginGroup(ENTRY_POINT_GROUP, Source, "source", RecipeError,
                                           declared_name=lambda cls: cls.name)


def source_class(name: str) -> type[Source]:
    """The source registered as ``name``."""
    return SOURCES.load(name)


# ---------------------------------------------------------------------------------------
# record ids, groups and labels: the same rules for every source
# ---------------------------------------------------------------------------------------


def cell_text(value: Any) -> str | None:
    """A data cell as UTF-8-safe text; ``None`` for a missing or empty cell (a number, 0 included, is text)."""
    if value is None:
        return None
    return safe_text(str(value)) or None


def record_id(value: Any) -> str | None:
    """A record id from a data cell (surrounding blanks removed); ``None`` when there is none."""
    return None if value is None else cell_text(str(value).strip())


def make_record(rid: str, items: dict[str, Any], group: Any = None, label: Any = None) -> Record:
    """A record whose group and label come from data cells: no group makes the record its own group."""
    return Record(id=rid, group=cell_text(group) or rid, items=items, label=cell_text(label))


def unique_ids(records: Iterable[Record | BadRecord]) -> Iterator[Record | BadRecord]:
    """``records`` with each record whose id came before turned into a bad record."""
    seen: set[str] = set()
    for rec in records:
        if isinstance(rec, Record):
            if rec.id in seen:
                yield BadRecord(rec.id, "duplicate id")
                continue
            seen.add(rec.id)
        yield rec


@dataclass
class SourceRead:
    """Everything a source yielded: its records and bad records, in order, and its counts."""

    records: list[Record] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def read_source(source: Source) -> SourceRead:
    """Read ``source`` to the end."""
    read = SourceRead()
    for rec in source:
        (read.bad if isinstance(rec, BadRecord) else read.records).append(rec)
    read.counts = {"records": len(read.records), "bad_records": len(read.bad), **source.counts}
    return read
