"""``coembed train``: a recipe, end to end, into a run folder.

Stages: data source -> split by group -> extraction per modality (cached) ->
training of the heads on every pair type -> evaluation -> saved model.

A run folder holds::

    recipe.yaml        the recipe as run (overrides applied)
    train.log          the log
    bad_items.jsonl    one line per skipped item: id, modality, reason; kept but suspect
                       items (silent audio) too, with "flagged": true
    history.jsonl      one line per epoch: loss, temperature, validation metrics
    metrics.json       best validation metrics, final retrieval (with class level) and
                       zero-shot metrics, counts, timings
    model/             the trained CoEmbedder (config.json + heads.safetensors)
    report.md          the run on one page (coembed.report), with its figures:
                       training-curve.png, umap-*.png, zeroshot-<name>.json + -confusion.png
    embeddings/        figure_sample.safetensors: what ``coembed plot`` redraws from
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

from coembed.data import Dataset, Record, check_bad_fraction, load_dataset, reason_kind
from coembed.evaluation import duplicate_groups, headline, unusable_items
from coembed.extraction import ExtractionStats, extract_with_recipe, store_root
from coembed.heads import build_head
from coembed.model import CoEmbedder
from coembed.recipe import Recipe, RecipeError
from coembed.registry import Adapter, create_adapter, resolve_key
from coembed.report import publish_run
from coembed.store import Lookup, content_identity
from coembed.training import PairSet, Trainer, evaluate_pairs
from coembed.zeroshot import run_recipe_zero_shot

log = logging.getLogger("coembed")
epoch_log = logging.getLogger("coembed.epochs")  # DEBUG: in train.log; on the console only with --verbose


class TooFewPairs(RuntimeError):
    """A pair type has fewer than 2 usable training pairs."""


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
    logging.getLogger("coembed").setLevel(logging.DEBUG)
    return handler


def build_adapters(recipe: Recipe) -> dict[str, Adapter]:
    return {m: create_adapter(resolve_key(m, cfg.adapter), **cfg.adapter_options)
            for m, cfg in recipe.modalities.items()}


def build_heads(recipe: Recipe, adapters: dict[str, Adapter]) -> torch.nn.ModuleDict:
    """Every modality's head, initialised from the recipe's seed; a head that cannot map its encoder's
    dimension to the anchor's is a :class:`RecipeError`."""
    anchor_dim = adapters[recipe.anchor].dim
    torch.manual_seed(recipe.seed)
    heads = torch.nn.ModuleDict()
    for m, cfg in recipe.modalities.items():
        try:
            heads[m] = build_head(cfg.head, adapters[m].dim, anchor_dim)
        except ValueError as exc:
            raise RecipeError(f"invalid recipe:\n  modalities.{m}.head: {exc}") from None
    return heads


def trained_modalities(recipe: Recipe) -> list[str]:
    return sorted({m for pair in recipe.pairs for m in pair}, key=list(recipe.modalities).index)


@dataclass
class Embedded:
    """One modality's embeddings for the records that hold an item of it."""

    row_of: dict[str, int]     # record id -> row
    lookup: Lookup
    stats: ExtractionStats

    def ok_row(self, record_id: str) -> int | None:
        """The row of the record's item when it is usable (held and embedded), else None."""
        row = self.row_of.get(record_id)
        return row if row is not None and bool(self.lookup.ok[row]) else None


def extract_all(recipe: Recipe, adapters: dict[str, Adapter], dataset: Dataset,
                progress: bool = True) -> dict[str, Embedded]:
    root = store_root(recipe)
    out: dict[str, Embedded] = {}
    for m in trained_modalities(recipe):
        records = [r for r in dataset.records if m in r.items]
        log.info("extracting %d %s items with %s (store %s)", len(records), m, adapters[m].key(),
                 root / adapters[m].fingerprint)
        lookup, stats = extract_with_recipe(adapters[m], [r.id for r in records], [r.items[m] for r in records],
                                            recipe, progress)
        log.info("%s: %d items, %d from the store, %d encoded in %.1fs (%.1f items/s), %d bad",
                 m, stats.items, stats.cached, stats.encoded, stats.seconds, stats.items_per_second, stats.bad)
        out[m] = Embedded({r.id: i for i, r in enumerate(records)}, lookup, stats)
    return out


def build_pair_sets(recipe: Recipe, dataset: Dataset, embedded: dict[str, Embedded]) -> list[PairSet]:
    pairs = []
    for a, b in recipe.pairs:
        tensors: list[torch.Tensor] = []
        paired: list[Record] = []
        for split in (dataset.train, dataset.validation):
            rows_a, rows_b, paired = [], [], []
            for r in split:
                ia, ib = embedded[a].ok_row(r.id), embedded[b].ok_row(r.id)
                if ia is not None and ib is not None:
                    rows_a.append(ia)
                    rows_b.append(ib)
                    paired.append(r)
            tensors += [torch.from_numpy(embedded[a].lookup.vectors[rows_a]),
                        torch.from_numpy(embedded[b].lookup.vectors[rows_b])]
        # ``paired`` now holds the validation records, in row order: their labels and duplicate items
        groups = duplicate_groups([content_identity(r.items[a]) for r in paired],
                                  [content_identity(r.items[b]) for r in paired])
        pair = PairSet(a, b, tensors[0], tensors[1], tensors[2], tensors[3],
                       val_labels=[r.label for r in paired], val_groups=groups)
        log.info("pair type %s: %d train pairs, %d validation pairs", pair.name, len(pair.train_a), len(pair.val_a))
        if len(pair.train_a) < 2:
            raise TooFewPairs(f"pair type {pair.name} has {len(pair.train_a)} usable training pairs; "
                               "at least 2 are needed (see bad_items.jsonl)")
        pairs.append(pair)
    return pairs


def bad_item_rows(dataset: Dataset, embedded: dict[str, Embedded]) -> list[dict[str, Any]]:
    rows = [{"id": b.id, "modality": b.modality, "reason": b.reason} for b in dataset.bad]
    for m, e in embedded.items():
        rows += unusable_items(list(e.row_of), m, e.lookup)
    return rows


def flagged_item_rows(embedded: dict[str, Embedded]) -> list[dict[str, Any]]:
    """Items kept although suspect (silent audio with ``data.silent_audio: keep``)."""
    rows = []
    for m, e in embedded.items():
        ids = list(e.row_of)
        rows += [{"id": ids[i], "modality": m, "reason": reason, "flagged": True}
                 for i, reason in sorted(e.lookup.flags.items())]
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # backslashreplace: a stray surrogate (an undecodable file name) is written as a valid JSON escape
    with path.open("w", encoding="utf-8", errors="backslashreplace") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def format_summary(metrics: dict[str, Any]) -> str:
    """The end-of-run block: what was read, pairs made, bad items by reason, time per stage."""
    counts = metrics["counts"]
    read = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts["read"].items())
    lines = ["summary", f"  read        {read}"]
    for m, stats in metrics["extraction"].items():
        lines.append(f"  {m:<11} {stats['items']} items: {stats['cached']} from the store, {stats['encoded']} "
                     f"encoded ({stats['encoded'] / stats['seconds'] if stats['seconds'] else 0:.1f}/s), "
                     f"{stats['bad']} bad, {stats['flagged']} flagged")
    lines.append("  pairs       " + ", ".join(f"{name}: {p['train']} train + {p['validation']} validation"
                                           for name, p in counts["pairs"].items()))
    lines.append(f"  bad items   {counts['bad_items']}" + "".join(
        f"\n    {n:>6}  {reason}" for reason, n in sorted(counts["bad_by_reason"].items(), key=lambda kv: -kv[1])))
    if counts["flagged_items"]:
        lines.append(f"  flagged     {counts['flagged_items']} (kept)" + "".join(
            f"\n    {n:>6}  {reason}" for reason, n in sorted(counts["flagged_by_reason"].items())))
    lines.append("  seconds     " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in metrics["seconds"].items()))
    return "\n".join(lines)


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
    for m in trained_modalities(recipe):
        adapters[m].model  # load weights first: a missing download stops the run before any work
    times["load_encoders"] = time.perf_counter() - t
    heads = build_heads(recipe, adapters)  # before any work too: a head that cannot map its encoder stops the run

    t = time.perf_counter()
    dataset = load_dataset(recipe, progress=progress)
    times["read"] = time.perf_counter() - t
    log.info("data: %d records (%d train, %d validation), %d bad", len(dataset.records), len(dataset.train),
             len(dataset.validation), len(dataset.bad))
    # fail before days of extraction when the source alone is already too bad (a lower bound of the final share)
    _write_jsonl(run_dir / "bad_items.jsonl", bad_item_rows(dataset, {}))
    check_bad_fraction(len(dataset.bad), len(dataset.bad) + len(dataset.records) * len(trained_modalities(recipe)),
                       recipe.data.max_bad_fraction)

    t = time.perf_counter()
    embedded = extract_all(recipe, adapters, dataset, progress)
    times["extract"] = time.perf_counter() - t

    bad_rows = bad_item_rows(dataset, embedded)
    flagged_rows = flagged_item_rows(embedded)
    _write_jsonl(run_dir / "bad_items.jsonl", bad_rows + flagged_rows)
    n_items = len(dataset.bad) + sum(e.stats.items for e in embedded.values())
    check_bad_fraction(len(bad_rows), n_items, recipe.data.max_bad_fraction)

    pairs = build_pair_sets(recipe, dataset, embedded)
    t = time.perf_counter()
    history_path = run_dir / "history.jsonl"
    with history_path.open("w", encoding="utf-8") as hist:
        def on_epoch(row: dict[str, float]) -> None:
            hist.write(json.dumps(row) + "\n")
            hist.flush()
            epoch_log.debug("epoch %d loss %.4f %s %.4f", row["epoch"], row["loss"], recipe.train.select_metric,
                     row.get(recipe.train.select_metric, float("nan")))

        trainer = Trainer(heads, pairs, recipe.train, seed=recipe.seed)
        result = trainer.fit(on_epoch, progress=progress)
    times["train"] = time.perf_counter() - t

    model = CoEmbedder.from_adapters(recipe.anchor, adapters, {m: c.head for m, c in recipe.modalities.items()},
                                     metadata={"recipe": recipe.name, "temperature": result.temperature,
                                               "pairs": [list(p) for p in recipe.pairs]})
    model.heads.load_state_dict(heads.state_dict())

    t = time.perf_counter()
    retrieval = evaluate_pairs(trainer.heads, trainer.pairs, class_level=True)  # the pairs already on the device
    zero_shot = run_recipe_zero_shot(recipe, model, run_dir, progress)
    times["evaluate"] = time.perf_counter() - t

    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "select_metric": recipe.train.select_metric,
        "validation": result.best_metrics,
        "retrieval": retrieval,
        "zero_shot": zero_shot,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "temperature": result.temperature,
        "counts": {
            "read": dataset.counts,
            "records": len(dataset.records),
            "train_records": len(dataset.train),
            "validation_records": len(dataset.validation),
            "bad_items": len(bad_rows),
            "bad_by_reason": dict(Counter(reason_kind(r["reason"]) for r in bad_rows)),
            "flagged_items": len(flagged_rows),
            "flagged_by_reason": dict(Counter(reason_kind(r["reason"]) for r in flagged_rows)),
            "pairs": {p.name: {"train": len(p.train_a), "validation": len(p.val_a)} for p in pairs},
        },
        "extraction": {m: asdict(e.stats) for m, e in embedded.items()},
        "seconds": {**times, "total": sum(times.values())},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    publish_run(recipe, run_dir, dataset, embedded, pairs, model)
    model.save_pretrained(run_dir / "model", run_dir=run_dir)  # last: its card holds the metrics and figures
    log.info("%s", format_summary(metrics))
    log.info("best epoch %d: %s", result.best_epoch, headline(result.best_metrics))
    log.info("wrote %s", run_dir)
    return RunResult(run_dir, model, metrics, result.history)

