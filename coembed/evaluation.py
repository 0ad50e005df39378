"""Evaluating a trained model on data: any data source read, embedded through the model, scored.

A trained :class:`~coembed.CoEmbedder` reads a data source the way training
does (the same sources, the same bad-item rules, the same embedding store, so
nothing is encoded twice), projects every item with its head, and is scored
with the metrics of :mod:`coembed.metrics`. :func:`retrieval_on_data` is
retrieval in both directions over the pairs of a data set;
:mod:`coembed.zeroshot` builds zero-shot classification on the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coembed.bad_items import BadItemRow
from coembed.config import DataConfig, ExtractionConfig
from coembed.errors import RecipeError
from coembed.extraction import extract_with_config
from coembed.layout import source_cache_dir
from coembed.metrics import paired_retrieval
from coembed.model import CoEmbedder
from coembed.recipe import source_problems
from coembed.registry import input_kinds
from coembed.sources import Record, SourceContext, SourceRead, build_source, read_source
from coembed.training import align_pairs


@dataclass(frozen=True)
class EvaluationData:
    """A data source to evaluate a model on, and how to read and encode it.

    ``columns`` maps a modality to the data column holding it (default: the
    modality's name); relative paths resolve against ``base_dir``.
    """

    data: DataConfig
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    columns: tuple[tuple[str, str], ...] = ()
    base_dir: Path = Path(".")

    def context(self, model: CoEmbedder, modalities: Sequence[str], progress: bool = False) -> SourceContext:
        """The source context for reading ``modalities`` of ``model`` from this data."""
        names = list(dict.fromkeys(modalities))
        for m in names:
            if m not in model.specs:
                raise ValueError(f"this model has no {m!r} modality; it has: {', '.join(model.specs)}")
        columns = dict(self.columns)
        return SourceContext(columns={m: columns.get(m, m) for m in names},
                             kinds=input_kinds({m: model.specs[m].adapter for m in names}),
                             base_dir=self.base_dir, cache_dir=source_cache_dir(self.extraction.cache_dir, self.base_dir),
                             progress=progress)

    def read(self, model: CoEmbedder, modalities: Sequence[str], progress: bool = False) -> SourceRead:
        """Every record of the data (unsplit) with the model's ``modalities``, and the inputs it could not read."""
        problems = source_problems(self.data)
        if problems:
            raise RecipeError(problems)
        return read_source(build_source(self.data, self.context(model, modalities, progress)))


@dataclass
class EmbeddedItems:
    """One modality of an evaluation set in the shared space: ``vectors[i]`` is record ``ids[i]``."""

    ids: list[str]
    vectors: torch.Tensor
    labels: list[str | None]
    bad: list[BadItemRow]   # every item that could not be used


def embed_records(model: CoEmbedder, evaluation: EvaluationData, modality: str, records: Sequence[Record],
                  progress: bool = True) -> EmbeddedItems:
    """Encode the ``modality`` items of ``records`` through the embedding store (cached,
    bad items skipped with their reason) and project them with the model's head."""
    held = [r for r in records if modality in r.items]
    ids = [r.id for r in held]
    lookup, _ = extract_with_config(model.adapter(modality), ids, [r.items[modality] for r in held],
                                    evaluation.extraction, evaluation.data, evaluation.base_dir, progress)
    rows = np.flatnonzero(lookup.ok)
    vectors = model.project(modality, lookup.gather(rows)).cpu()
    return EmbeddedItems([ids[i] for i in rows], vectors, [held[i].label for i in rows],
                         lookup.bad_rows(ids, modality))


def retrieval_on_data(model: CoEmbedder, evaluation: EvaluationData, pairs: Sequence[tuple[str, str]],
                      chunk_size: int = 1024, progress: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`~coembed.metrics.paired_retrieval` (class level too where records have labels) of every
    pair type over all records of the data; returns the metrics and the counts behind them."""
    modalities = list(dict.fromkeys(m for p in pairs for m in p))
    if len(modalities) < 2:
        raise ValueError("retrieval needs a pair of two modalities")
    read = evaluation.read(model, modalities, progress)
    embedded = {m: embed_records(model, evaluation, m, read.records, progress) for m in modalities}
    metrics: dict[str, float] = {}
    counts: dict[str, Any] = {"records": len(read.records), "bad_records": len(read.bad),
                              "bad_items": {m: len(e.bad) for m, e in embedded.items()}, "pairs": {}}
    for a, b in pairs:
        row_a = {rid: i for i, rid in enumerate(embedded[a].ids)}
        row_b = {rid: i for i, rid in enumerate(embedded[b].ids)}
        aligned = align_pairs(read.records, row_a.get, row_b.get)
        counts["pairs"][f"{a}-{b}"] = len(aligned)
        if len(aligned) < 2:
            continue
        metrics.update(paired_retrieval(embedded[a].vectors[aligned.rows_a], embedded[b].vectors[aligned.rows_b],
                                        a, b, chunk_size, labels=[r.label for r in aligned.records],
                                        duplicates=aligned.duplicates(a, b)))
    return metrics, counts
