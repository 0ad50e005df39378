"""A recipe's data: its source read into records, split by group into train and validation.

The split is by group (a video's clips, a recording's takes): a group never
straddles train and validation, so validation measures generalisation to
unseen groups, not to unseen cuts of seen ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coembed.config import Recipe
from coembed.layout import source_cache_dir
from coembed.registry import input_kinds
from coembed.sources import BadRecord, Record, Source, SourceContext, build_source, read_source


def modality_kinds(recipe: Recipe) -> dict[str, str]:
    """modality -> ``"file"`` or ``"text"``: how the modality's adapter takes raw input."""
    return input_kinds(recipe.adapter_keys())


def source_context(recipe: Recipe, progress: bool = False) -> SourceContext:
    """What the recipe's data source needs to read: columns, input kinds, base folder, seed, cache folder."""
    return SourceContext(columns={m: (cfg.column or m) for m, cfg in recipe.modalities.items()},
                         kinds=modality_kinds(recipe), base_dir=Path(recipe.base_dir), seed=recipe.seed,
                         cache_dir=source_cache_dir(recipe.extraction.cache_dir, recipe.base_dir),
                         progress=progress)


def recipe_source(recipe: Recipe, progress: bool = False) -> Source:
    """The data source the recipe's ``data`` section names, ready to read."""
    return build_source(recipe.data, source_context(recipe, progress))


def split_by_group(records: Sequence[Record], validation: float, seed: int) -> tuple[list[Record], list[Record]]:
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
    #: what the source read (records, bad records and the source's own counts), for the run summary
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def records(self) -> list[Record]:
        return self.train + self.validation


def load_dataset(recipe: Recipe, progress: bool = False) -> Dataset:
    """Read the recipe's source (with progress bars for its slow stages) and split it by group."""
    read = read_source(recipe_source(recipe, progress))
    train, val = split_by_group(read.records, recipe.data.split.validation, recipe.seed)
    return Dataset(train, val, read.bad, read.counts)
