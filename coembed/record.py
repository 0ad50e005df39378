"""The training record of a run: typed reading, and JSON that any reader can parse.

A run folder (and a model folder saved with its record) holds ``recipe.yaml``,
``metrics.json`` and ``history.jsonl`` (:mod:`coembed.layout`). They are
written here, and read back here into typed objects (:class:`Recipe`,
:class:`RunMetrics`), so the report, the figures and the model card agree on
what a key means and on its default.

JSON is written strictly: a ``NaN`` or infinite value (an epoch without a
validation metric, say) is written as ``null``, never as Python's ``NaN``,
which other JSON readers refuse. ``null`` reads back as ``None``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from coembed import layout
from coembed.config import Recipe, parse_recipe
from coembed.errors import RecipeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# strict JSON
# ---------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (NaN and infinities as ``null``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as indented strict JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl_row(fh: IO[str], row: dict[str, Any]) -> None:
    """Append one strict JSON line to an open file and flush it (a killed run keeps every line written)."""
    fh.write(dumps(row, ensure_ascii=False) + "\n")
    fh.flush()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    # backslashreplace: a stray surrogate (an undecodable file name) is written as a valid JSON escape
    with path.open("w", encoding="utf-8", errors="backslashreplace") as fh:
        for row in rows:
            fh.write(dumps(row, ensure_ascii=False) + "\n")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` (with a warning) when it is missing, unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is not valid JSON (%s); ignoring it", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of the lines of ``path`` (a partial last line of a killed run is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# metrics.json
# ---------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """Keys this coembed does not know (written by a newer one) are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class PairCounts(_Lenient):
    train: int = 0
    validation: int = 0


class RunCounts(_Lenient):
    """What a run read and used."""

    read: dict[str, int] = Field(default_factory=dict, description="what the source read (records, videos, ...)")
    records: int | None = None
    train_records: int | None = None
    validation_records: int | None = None
    bad_items: int | None = None
    bad_by_reason: dict[str, int] = Field(default_factory=dict)
    flagged_items: int = 0
    flagged_by_reason: dict[str, int] = Field(default_factory=dict)
    pairs: dict[str, PairCounts] = Field(default_factory=dict)


class RunMetrics(_Lenient):
    """The content of ``metrics.json``. Metric values are ``None`` where a metric has no value."""

    best_epoch: int | None = None
    epochs_run: int | None = None
    select_metric: str | None = None
    #: validation metrics of the best epoch, as model selection saw them (on ``validation_pairs["selection"]``)
    validation: dict[str, float | None] = Field(default_factory=dict)
    #: per pair type, the validation pairs model selection ranked and all of them: ``{"selection", "full"}``
    validation_pairs: dict[str, dict[str, int]] = Field(default_factory=dict)
    #: model selection validated every this many epochs
    validate_every: int | None = None
    #: the final retrieval of the kept heads on every validation pair (class level too)
    retrieval: dict[str, float | None] = Field(default_factory=dict)
    #: zero-shot metrics by set name; ``{"error": ...}`` for a set that could not be evaluated
    zero_shot: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: retrieval on other data (``coembed eval retrieval RUN``), by name
    retrieval_sets: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    final_loss: float | None = None
    temperature: float | None = None
    counts: RunCounts = Field(default_factory=RunCounts)
    extraction: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)

    @property
    def headline_metrics(self) -> dict[str, float]:
        """The retrieval metrics of the kept heads: the final evaluation, else the validation's, without gaps."""
        values = self.retrieval or self.validation
        return {k: v for k, v in values.items() if v is not None}

    def zero_shot_results(self) -> dict[str, dict[str, Any]]:
        """The zero-shot sets that were evaluated (not those that failed)."""
        return {name: m for name, m in self.zero_shot.items() if "error" not in m}

    def zero_shot_errors(self) -> dict[str, str]:
        return {name: str(m["error"]) for name, m in self.zero_shot.items() if "error" in m}


def read_metrics(folder: Path) -> RunMetrics:
    """``metrics.json`` of a run or model folder (empty when it has none)."""
    data = read_json(folder / layout.METRICS)
    try:
        return RunMetrics.model_validate(data)
    except ValueError as exc:
        log.warning("%s does not read as coembed metrics (%s); ignoring it", folder / layout.METRICS, exc)
        return RunMetrics()


def write_metrics(folder: Path, metrics: RunMetrics) -> Path:
    return write_json(folder / layout.METRICS, metrics.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------
# the whole record
# ---------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What a run (or model) folder records of its training; parts it lacks are empty."""

    folder: Path
    recipe_text: str = ""
    #: the recipe as run, checked against the schema; ``None`` when there is none or it does not read
    recipe: Recipe | None = None
    metrics: RunMetrics = field(default_factory=RunMetrics)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.recipe.name if self.recipe is not None else self.folder.name


def read_recipe(folder: Path) -> tuple[str, Recipe | None]:
    """``(text, recipe)`` of ``recipe.yaml`` in ``folder``; the recipe is ``None`` when missing or unreadable."""
    path = folder / layout.RECIPE
    if not path.is_file():
        return "", None
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        return text, parse_recipe(data, base_dir=folder) if isinstance(data, dict) else None
    except (yaml.YAMLError, RecipeError) as exc:
        log.warning("%s does not read as a recipe of this coembed (%s)", path, exc)
        return text, None


def read_record(folder: Path) -> RunRecord:
    """The recipe, metrics and history recorded in ``folder``."""
    folder = Path(folder)
    text, recipe = read_recipe(folder)
    return RunRecord(folder, text, recipe, read_metrics(folder), read_jsonl(folder / layout.HISTORY))
