"""Data sources: where paired records come from, and the split by group.

A source yields :class:`Record` objects ``{id, group, label, items}`` where
``items`` maps a modality name to a raw item (a path, a string, an
:class:`~coembed.media.AudioSegment`, ...), and :class:`BadRecord` objects for
inputs it could not turn into a record. Sources register by name in
:data:`SOURCES`; each declares its options as a pydantic model so a recipe is
checked before any work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coembed.media import safe_text

if TYPE_CHECKING:
    from coembed.recipe import Recipe


@dataclass
class Record:
    """One paired example: the raw items of several modalities that belong together."""

    id: str
    group: str
    items: dict[str, Any]
    label: str | None = None


@dataclass
class BadRecord:
    """An input that could not become a record, with the reason."""

    id: str
    reason: str
    modality: str | None = None


class SourceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(ABC):
    """A reader of paired records. Subclasses set ``name`` and ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[SourceOptions]] = SourceOptions

    def __init__(self, options: SourceOptions, recipe: "Recipe") -> None:
        self.options = options
        self.recipe = recipe
        #: show progress bars for slow stages of reading (set by :func:`load_dataset`)
        self.progress = False
        #: what the source read, for the run summary (e.g. ``{"videos": 1200}``); filled while iterating
        self.counts: dict[str, int] = {}

    @property
    def columns(self) -> dict[str, str]:
        """modality -> column name in the data."""
        return {m: (cfg.column or m) for m, cfg in self.recipe.modalities.items()}

    @abstractmethod
    def __iter__(self) -> Iterator[Record | BadRecord]:
        """Yield records (and bad records) in a deterministic order."""

    def describe(self) -> str:
        return f"{self.name} source"


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make a source available to recipes under ``cls.name``."""
    SOURCES[cls.name] = cls
    return cls


def _source_class(name: str) -> type[Source]:
    _import_builtin_sources()
    if name not in SOURCES:
        from coembed.recipe import RecipeError

        raise RecipeError(f"invalid recipe:\n  data.source: unknown source {name!r}; "
                          f"allowed: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def _import_builtin_sources() -> None:
    """Sources that live in their own modules register on import."""
    import importlib

    for module in ("coembed.video", "coembed.hf_source", "coembed.esc50"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def validate_source_options(recipe: "Recipe") -> None:
    from coembed.recipe import DataConfig, RecipeError, _format_errors

    cls = _source_class(recipe.data.source)
    try:
        cls.Options(**recipe.data.source_options)
    except ValidationError as exc:
        allowed = ", ".join(sorted(cls.Options.model_fields))
        raise RecipeError("invalid recipe:\n" + _format_errors(exc, "data")
                          + f"\n    (source {cls.name!r} accepts: {allowed}, "
                          + ", ".join(DataConfig.COMMON_KEYS) + ")") from None


def build_source(recipe: "Recipe") -> Source:
    cls = _source_class(recipe.data.source)
    return cls(cls.Options(**recipe.data.source_options), recipe)


def modality_kinds(recipe: "Recipe") -> dict[str, str]:
    """modality -> ``"file"`` or ``"text"``: how the adapter takes raw input."""
    from coembed.registry import get_adapter_class, resolve_key

    return {m: get_adapter_class(resolve_key(m, cfg.adapter)).raw_input
            for m, cfg in recipe.modalities.items()}


# ---------------------------------------------------------------------------------------
# manifest (CSV / JSONL)
# ---------------------------------------------------------------------------------------


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


@register_source
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
        return self.recipe.resolve_path(self.options.path)

    def describe(self) -> str:
        return f"manifest {self.path}"

    def __iter__(self) -> Iterator[Record | BadRecord]:
        path = self.path
        if not path.is_file():
            from coembed.recipe import RecipeError

            raise RecipeError(f"data.path: manifest not found: {path}")
        root = self.recipe.resolve_path(self.options.root) if self.options.root else path.parent
        kinds = modality_kinds(self.recipe)
        yield from records_from_rows(read_manifest_rows(path), self.options, self.columns, kinds, root)


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


# ---------------------------------------------------------------------------------------
# generated media (the quickstart's data; real files written by the project)
# ---------------------------------------------------------------------------------------

GENERATED_CLASSES = [
    ("red circle", "low hum", (220, 40, 40), 220.0),
    ("green square", "mid tone", (40, 200, 60), 440.0),
    ("blue triangle", "high whistle", (50, 80, 230), 880.0),
    ("yellow cross", "buzz", (230, 210, 40), 330.0),
    ("purple ring", "chirp", (150, 60, 200), 660.0),
    ("cyan bar", "beep", (40, 210, 210), 1320.0),
    ("orange dot", "drone", (250, 140, 30), 110.0),
    ("grey star", "whine", (128, 128, 128), 1760.0),
]


def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw one of the generated classes' shapes centred on ``(cx, cy)`` with radius ``r``."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=colour)
    elif shape == "dot":
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * math.cos(math.pi / 5 * k - math.pi / 2),
                   cy + (r if k % 2 == 0 else r / 2.5) * math.sin(math.pi / 5 * k - math.pi / 2)) for k in range(10)]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class GeneratedOptions(SourceOptions):
    path: str = Field(description="folder the media and manifest.csv are written to (reused when present)")
    classes: int = Field(default=4, ge=2, le=len(GENERATED_CLASSES))
    items_per_class: int = Field(default=30, ge=1)
    image_size: int = Field(default=96, ge=16)
    audio_seconds: float = Field(default=2.0, ge=1.0)
    sample_rate: int = Field(default=16000, ge=8000)


def generate_media(folder: Path, classes: int, items_per_class: int, image_size: int = 96,
                   audio_seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write a labelled set of paired PNG images and WAV files plus ``manifest.csv``.

    Each class has a colour/shape and a tone; each item also has its own
    continuous parameter shown in both modalities (the shape's size and
    position, the tone's pitch offset and amplitude envelope), so pairs can be
    matched within a class too. Deterministic for a seed.
    """
    import soundfile as sf
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    t = np.arange(int(audio_seconds * sample_rate)) / sample_rate
    for c in range(classes):
        shape_label, sound_label, colour, freq = GENERATED_CLASSES[c]
        label = shape_label.split()[1]
        for i in range(items_per_class):
            rid = f"c{c}-{i:04d}"
            u = float(rng.uniform(0.0, 1.0))  # the item's own parameter, shared by both modalities
            image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            r = image_size * (0.12 + 0.3 * u)
            cx = image_size * (0.3 + 0.4 * u)
            cy = image_size * (0.7 - 0.4 * u)
            _draw_shape(draw, shape_label.split()[1], cx, cy, r, colour)
            noise = rng.normal(0, 6, (image_size, image_size, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{rid}.png")
            f = freq * (1.0 + 0.5 * u)
            envelope = 0.2 + 0.6 * (0.5 + 0.5 * np.sin(2 * np.pi * (0.5 + 3.0 * u) * t))
            wave = envelope * np.sin(2 * np.pi * f * t) + rng.normal(0, 0.01, t.shape)
            sf.write(folder / f"{rid}.wav", (0.5 * wave).astype(np.float32), sample_rate, subtype="PCM_16")
            rows.append({"id": rid, "group": rid, "label": label, "image": f"{rid}.png", "audio": f"{rid}.wav",
                         "text": f"a {shape_label} with a {sound_label}"})
    manifest = folder / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)  # written last: its presence means the set is complete
    return manifest


@register_source
class GeneratedSource(Source):
    """Labelled image/audio/text triples that coembed generates and writes to disk."""

    name = "generated"
    Options = GeneratedOptions
    options: GeneratedOptions

    def describe(self) -> str:
        o = self.options
        return f"generated media ({o.classes} classes x {o.items_per_class} items) in {self.recipe.resolve_path(o.path)}"

    def __iter__(self) -> Iterator[Record | BadRecord]:
        o = self.options
        folder = self.recipe.resolve_path(o.path)
        stamp = folder / "generated.json"
        spec = o.model_dump() | {"seed": self.recipe.seed}
        manifest = folder / "manifest.csv"
        if not (manifest.is_file() and _read_stamp(stamp) == spec):
            generate_media(folder, o.classes, o.items_per_class, o.image_size, o.audio_seconds,
                           o.sample_rate, seed=self.recipe.seed)
            tmp = stamp.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(spec))
            os.replace(tmp, stamp)  # a killed run leaves no half-written stamp
        manifest_options = ManifestOptions(path=str(manifest))
        yield from records_from_rows(read_manifest_rows(manifest), manifest_options, self.columns,
                                     modality_kinds(self.recipe), folder)


def _read_stamp(stamp: Path) -> Any:
    """The options a generated set was written with; ``None`` when the stamp is missing or unreadable."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------


def split_by_group(records: list[Record], validation: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic train/validation split in which a group never straddles both sides.

    Groups are ordered by a hash of ``(seed, group)``; the first
    ``round(validation * n_groups)`` groups (at least one when ``validation``
    > 0 and there are two or more groups) go to validation.
    """
    groups = sorted({r.group for r in records},
                    key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    n_val = int(round(validation * len(groups)))
    if validation > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[:n_val])
    train = [r for r in records if r.group not in val_groups]
    val = [r for r in records if r.group in val_groups]
    return train, val


@dataclass
class Dataset:
    """Records of a source with the bad ones set aside, split by group."""

    train: list[Record]
    validation: list[Record]
    bad: list[BadRecord] = field(default_factory=list)
    #: what the source read (``Source.counts``), for the run summary
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def records(self) -> list[Record]:
        return self.train + self.validation


def load_dataset(recipe: "Recipe", progress: bool = False) -> Dataset:
    """Read the recipe's source (with progress bars for its slow stages) and split it by group."""
    source = build_source(recipe)
    source.progress = progress
    records: list[Record] = []
    bad: list[BadRecord] = []
    for rec in source:
        (bad if isinstance(rec, BadRecord) else records).append(rec)
    train, val = split_by_group(records, recipe.data.split.validation, recipe.seed)
    return Dataset(train, val, bad, {"records": len(records), "bad_records": len(bad), **source.counts})


def reason_kind(reason: str) -> str:
    """The kind of a bad-item reason, for summaries: the text before any colon or parenthesis."""
    return reason.split(":")[0].split("(")[0].strip()


def bad_fraction(n_bad: int, n_total: int) -> float:
    return n_bad / n_total if n_total else 0.0


class TooManyBadItems(RuntimeError):
    """The share of bad items passed ``data.max_bad_fraction``."""


def check_bad_fraction(n_bad: int, n_total: int, limit: float) -> None:
    """Fail when the share of bad items passes ``limit`` (a recipe setting)."""
    frac = bad_fraction(n_bad, n_total)
    if n_total and frac > limit and not math.isclose(frac, limit):
        raise TooManyBadItems(f"{n_bad} of {n_total} items are bad ({frac:.0%}), above the limit "
                           f"data.max_bad_fraction={limit:g}; see bad_items.jsonl in the run folder")
