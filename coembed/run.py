"""``coembed train``: a recipe, end to end, into a run folder.

Stages: data source -> split by group -> extraction per modality (cached) ->
training of the heads on every pair type -> evaluation -> saved model.

A run folder holds::

    recipe.yaml        the recipe as run (overrides applied)
    train.log          the log
    bad_items.jsonl    one line per skipped item: id, modality, reason
    history.jsonl      one line per epoch: loss, temperature, validation metrics
    metrics.json       best validation metrics, counts, timings
    model/             the trained CoEmbedder (config.json + heads.safetensors)
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coembed.data import Dataset, check_bad_fraction, load_dataset, reason_kind
from coembed.extraction import ExtractionStats, extract
from coembed.heads import build_head
from coembed.model import CoEmbedder
from coembed.recipe import Recipe
from coembed.registry import Adapter, create_adapter, resolve_key
from coembed.store import DEFAULT_CACHE_DIR, Lookup
from coembed.training import PairSet, Trainer

log = logging.getLogger("coembed")


@dataclass
class RunResult:
    run_dir: Path
    model: CoEmbedder
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def make_run_dir(recipe: Recipe, run_dir: str | Path | None = None) -> Path:
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = recipe.resolve_path(recipe.output_dir) / f"{recipe.name}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("coembed").addHandler(handler)
    logging.getLogger("coembed").setLevel(logging.INFO)
    return handler


def build_adapters(recipe: Recipe) -> dict[str, Adapter]:
    return {m: create_adapter(resolve_key(m, cfg.adapter), **cfg.adapter_options)
            for m, cfg in recipe.modalities.items()}


def trained_modalities(recipe: Recipe) -> list[str]:
    return sorted({m for pair in recipe.pairs for m in pair}, key=list(recipe.modalities).index)


@dataclass
class Embedded:
    """One modality's embeddings for the records that hold an item of it."""

    row_of: dict[str, int]     # record id -> row
    lookup: Lookup
    stats: ExtractionStats


def extract_all(recipe: Recipe, adapters: dict[str, Adapter], dataset: Dataset,
                progress: bool = True) -> dict[str, Embedded]:
    ex = recipe.extraction
    root = Path(ex.cache_dir).expanduser() if ex.cache_dir else DEFAULT_CACHE_DIR
    out: dict[str, Embedded] = {}
    for m in trained_modalities(recipe):
        records = [r for r in dataset.records if m in r.items]
        log.info("extracting %d %s items with %s (store %s)", len(records), m, adapters[m].key(),
                 root / adapters[m].fingerprint)
        lookup, stats = extract(adapters[m], [r.id for r in records], [r.items[m] for r in records], root,
                                batch_size=ex.batch_size, num_workers=ex.num_workers,
                                shard_size=ex.shard_size, progress=progress)
        log.info("%s: %d items, %d from the store, %d encoded in %.1fs (%.1f items/s), %d bad",
                 m, stats.items, stats.cached, stats.encoded, stats.seconds, stats.items_per_second, stats.bad)
        out[m] = Embedded({r.id: i for i, r in enumerate(records)}, lookup, stats)
    return out


def build_pair_sets(recipe: Recipe, dataset: Dataset, embedded: dict[str, Embedded]) -> list[PairSet]:
    pairs = []
    for a, b in recipe.pairs:
        tensors = []
        for split in (dataset.train, dataset.validation):
            rows_a, rows_b = [], []
            for r in split:
                ia, ib = embedded[a].row_of.get(r.id), embedded[b].row_of.get(r.id)
                if ia is not None and ib is not None and embedded[a].lookup.ok[ia] and embedded[b].lookup.ok[ib]:
                    rows_a.append(ia), rows_b.append(ib)
            tensors += [torch.from_numpy(embedded[a].lookup.vectors[rows_a]),
                        torch.from_numpy(embedded[b].lookup.vectors[rows_b])]
        pair = PairSet(a, b, tensors[0], tensors[1], tensors[2], tensors[3])
        log.info("pair type %s: %d train pairs, %d validation pairs", pair.name, len(pair.train_a), len(pair.val_a))
        if len(pair.train_a) < 2:
            raise RuntimeError(f"pair type {pair.name} has {len(pair.train_a)} usable training pairs; "
                               "at least 2 are needed (see bad_items.jsonl)")
        pairs.append(pair)
    return pairs


def bad_item_rows(dataset: Dataset, embedded: dict[str, Embedded]) -> list[dict[str, Any]]:
    rows = [{"id": b.id, "modality": b.modality, "reason": b.reason} for b in dataset.bad]
    for m, e in embedded.items():
        ids = list(e.row_of)
        rows += [{"id": ids[i], "modality": m, "reason": reason} for i, reason in sorted(e.lookup.errors.items())]
        rows += [{"id": ids[i], "modality": m, "reason": "missing from the store"} for i in e.lookup.missing]
    return rows


def train_recipe(recipe: Recipe, run_dir: str | Path | None = None, progress: bool = True) -> RunResult:
    """Run ``recipe`` end to end; returns the run folder, the model and the metrics."""
    run_dir = make_run_dir(recipe, run_dir)
    handler = _attach_log_file(run_dir)
    try:
        return _train(recipe, run_dir, progress)
    finally:
        logging.getLogger("coembed").removeHandler(handler)
        handler.close()


def _train(recipe: Recipe, run_dir: Path, progress: bool) -> RunResult:
    times: dict[str, float] = {}
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    log.info("run folder %s", run_dir)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)

    t = time.perf_counter()
    adapters = build_adapters(recipe)
    dataset = load_dataset(recipe)
    times["read"] = time.perf_counter() - t
    log.info("data: %d records (%d train, %d validation), %d bad", len(dataset.records), len(dataset.train),
             len(dataset.validation), len(dataset.bad))

    t = time.perf_counter()
    embedded = extract_all(recipe, adapters, dataset, progress)
    times["extract"] = time.perf_counter() - t

    bad_rows = bad_item_rows(dataset, embedded)
    with (run_dir / "bad_items.jsonl").open("w", encoding="utf-8") as fh:
        for row in bad_rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    n_items = len(dataset.bad) + sum(e.stats.items for e in embedded.values())
    check_bad_fraction(len(bad_rows), n_items, recipe.data.max_bad_fraction)

    pairs = build_pair_sets(recipe, dataset, embedded)
    anchor_dim = adapters[recipe.anchor].dim
    torch.manual_seed(recipe.seed)
    heads = torch.nn.ModuleDict({m: build_head(cfg.head, adapters[m].dim, anchor_dim)
                                 for m, cfg in recipe.modalities.items()})
    t = time.perf_counter()
    history_path = run_dir / "history.jsonl"
    with history_path.open("w", encoding="utf-8") as hist:
        def on_epoch(row: dict[str, float]) -> None:
            hist.write(json.dumps(row) + "\n")
            hist.flush()
            log.info("epoch %d loss %.4f %s %.4f", row["epoch"], row["loss"], recipe.train.select_metric,
                     row.get(recipe.train.select_metric, float("nan")))

        result = Trainer(heads, pairs, recipe.train, seed=recipe.seed).fit(on_epoch, progress=progress)
    times["train"] = time.perf_counter() - t

    model = CoEmbedder.from_adapters(recipe.anchor, adapters, {m: c.head for m, c in recipe.modalities.items()},
                                     metadata={"recipe": recipe.name, "temperature": result.temperature})
    model.heads.load_state_dict(heads.state_dict())
    model.save_pretrained(run_dir / "model")

    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "select_metric": recipe.train.select_metric,
        "validation": result.best_metrics,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "temperature": result.temperature,
        "counts": {
            "records": len(dataset.records),
            "train_records": len(dataset.train),
            "validation_records": len(dataset.validation),
            "bad_items": len(bad_rows),
            "bad_by_reason": dict(Counter(reason_kind(r["reason"]) for r in bad_rows)),
            "pairs": {p.name: {"train": len(p.train_a), "validation": len(p.val_a)} for p in pairs},
        },
        "extraction": {m: asdict(e.stats) for m, e in embedded.items()},
        "seconds": {**times, "total": sum(times.values())},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("best epoch %d: %s", result.best_epoch,
             ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items() if k.endswith("R@1") or k == "mean_r1"))
    log.info("wrote %s", run_dir)
    return RunResult(run_dir, model, metrics, result.history)

