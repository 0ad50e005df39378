"""``coembed train``: a recipe, end to end, into a run folder; ``coembed embed``: its extraction stage alone.

The stages, in order:

1. load the encoders (a missing download stops the run before any work) and build the heads;
2. read the data source and split it by group (:mod:`coembed.dataset`);
3. extract every trained modality through the embedding store (:mod:`coembed.extraction`);
4. train the heads on every pair type (:mod:`coembed.training`), or fit them in closed form
   (``train.method``, :mod:`coembed.alignment`);
5. evaluate: retrieval of the kept heads, the recipe's zero-shot sets (:mod:`coembed.zeroshot`);
6. save the model and ``metrics.json``: from here on the run's result is safe;
7. best effort: the figures (:mod:`coembed.plots`) and ``report.md`` (:mod:`coembed.report`); a step that fails
   is logged with how to redo it, and the run stays complete.

Under ``torchrun`` (:mod:`coembed.distributed`) every process runs this; process 0 alone loads the encoders,
extracts and writes the run folder, while the others wait for it, read the finished store and each train on
their shard of the pairs; they stop after training.

A run folder holds (names in :mod:`coembed.layout`)::

    recipe.yaml        the recipe as run (overrides applied)
    train.log          the log
    bad_items.jsonl    one line per skipped item: id, modality, reason; kept but suspect
                       items (silent audio) too, with "flagged": true
    history.jsonl      one line per epoch: loss, temperature, validation metrics
    metrics.json       best validation metrics, final retrieval (with class level) and
                       zero-shot metrics, counts, timings
    model/             the trained CoEmbedder (config.json + heads.safetensors + model card)
    report.md          the run on one page, with its figures:
                       training-curve.png, umap-*.png, zeroshot-<name>.json + -confusion.png
    embeddings/        figure_sample.safetensors: what ``coembed plot`` redraws from

``coembed embed`` runs stages 2 and 3 only (the store filled, nothing trained) into a folder holding
``recipe.yaml``, ``embed.log``, ``bad_items.jsonl`` and ``extraction.json`` (what each modality's extraction did);
a later ``coembed train`` of the same recipe finds every item in the store and encodes nothing.

The extraction engine is the recipe's ``extraction.engine``: :class:`~coembed.extraction.LocalEngine`, or the Ray
engine, whose module (:mod:`coembed.ray_extraction`, the only one that imports Ray) is imported by name in
:func:`extraction_engine` when a recipe asks for it, so that Ray stays an optional extra.
"""

from __future__ import annotations

import importlib
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coembed import layout
from coembed.alignment import Aligner
from coembed.bad_items import check_bad_fraction, check_pair_fraction, count_reasons
from coembed.config import ExtractionConfig, HeadConfig, Recipe
from coembed.dataset import Dataset, load_dataset
from coembed.distributed import SINGLE, World, join, leave
from coembed.errors import AdapterError, RecipeError, TooManyBadItems
from coembed.extraction import ExtractionEngine, LocalEngine, ModalityEmbeddings, extract_dataset
from coembed.heads import build_head
from coembed.memory import release_freed_memory, steady_large_blocks
from coembed.metrics import headline
from coembed.model import CoEmbedder
from coembed.model.card import write_model_card
from coembed.model.folder import copy_record
from coembed.plots import build_figure_sample, draw_run_figures, plot_zero_shot
from coembed.record import RunCounts, RunMetrics, write_json, write_jsonl, write_jsonl_row, write_metrics
from coembed.registry import Adapter, create_adapter
from coembed.report import write_report
from coembed.training import PairSet, Trainer, build_pair_sets
from coembed.zeroshot import load_results, run_zero_shot

log = logging.getLogger("coembed")
epoch_log = logging.getLogger("coembed.epochs")  # DEBUG: in train.log; on the console only with --verbose


@dataclass
class RunResult:
    run_dir: Path
    model: CoEmbedder
    #: what ``metrics.json`` holds (:class:`~coembed.record.RunMetrics` as a dict)
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def make_run_dir(recipe: Recipe, run_dir: str | Path | None = None, kind: str = "") -> Path:
    """``run_dir``, or a new ``<output_dir>/<name>[-<kind>]-<time>`` folder."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = recipe.resolve_path(recipe.output_dir) / f"{recipe.name}{'-' + kind if kind else ''}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _attach_log_file(run_dir: Path, name: str = layout.TRAIN_LOG) -> logging.Handler:
    handler = logging.FileHandler(run_dir / name, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("coembed").addHandler(handler)
    logging.getLogger("coembed").setLevel(logging.DEBUG)
    return handler


def build_adapters(recipe: Recipe) -> dict[str, Adapter]:
    return {m: create_adapter(key, **recipe.modalities[m].adapter_options) for m, key in recipe.adapter_keys().items()}


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
            raise RecipeError(f"modalities.{m}.head: {exc}") from None
    return heads


def build_fitter(recipe: Recipe, heads: torch.nn.ModuleDict, pairs: list[PairSet],
                 world: World = SINGLE) -> Trainer | Aligner:
    """What fits the heads: the contrastive :class:`Trainer`, or the :class:`Aligner` of ``train.method``
    (one process: a closed-form fit needs every pair in one place)."""
    if recipe.train.method == "contrastive":
        return Trainer(heads, pairs, recipe.train, seed=recipe.seed, world=world)
    if world.distributed:
        raise ValueError(f"train.method={recipe.train.method} is fitted in one process; "
                         "run it without torchrun (only the contrastive trainer spreads over processes)")
    return Aligner(heads, pairs, recipe.train, recipe.anchor, seed=recipe.seed)


def bad_item_rows(dataset: Dataset, embedded: dict[str, ModalityEmbeddings]) -> list[dict[str, Any]]:
    """Every skipped item: records the source could not read, items the extraction could not use."""
    rows = [b.row() for b in dataset.bad]
    for e in embedded.values():
        rows += e.bad_rows()
    return rows


def extraction_lines(read: dict[str, int], extraction: dict[str, dict[str, Any]]) -> list[str]:
    """What was read and, per modality, what its extraction did (a block of the end-of-run summary)."""
    lines = ["  read        " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in read.items())]
    for m, stats in extraction.items():
        lines.append(f"  {m:<11} {stats['items']} items: {stats['cached']} from the store, {stats['encoded']} "
                     f"encoded ({stats['encoded'] / stats['seconds'] if stats['seconds'] else 0:.1f}/s), "
                     f"{stats['bad']} bad, {stats['flagged']} flagged")
    return lines


def bad_item_lines(n_bad: int, bad_by_reason: dict[str, int], n_flagged: int,
                   flagged_by_reason: dict[str, int]) -> list[str]:
    """Bad and flagged items by reason (a block of the end-of-run summary)."""
    lines = [f"  bad items   {n_bad}" + "".join(
        f"\n    {n:>6}  {reason}" for reason, n in sorted(bad_by_reason.items(), key=lambda kv: -kv[1]))]
    if n_flagged:
        lines.append(f"  flagged     {n_flagged} (kept)" + "".join(
            f"\n    {n:>6}  {reason}" for reason, n in sorted(flagged_by_reason.items())))
    return lines


def format_summary(metrics: RunMetrics) -> str:
    """The end-of-run block: what was read, pairs made, bad items by reason, time per stage."""
    counts = metrics.counts
    lines = ["summary", *extraction_lines(counts.read, metrics.extraction)]
    lines.append("  pairs       " + ", ".join(f"{name}: {p.train} train + {p.validation} validation"
                                           for name, p in counts.pairs.items()))
    lines += bad_item_lines(counts.bad_items, counts.bad_by_reason, counts.flagged_items, counts.flagged_by_reason)
    lines.append("  seconds     " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in metrics.seconds.items()))
    return "\n".join(lines)


def train_recipe(recipe: Recipe, run_dir: str | Path | None = None, progress: bool = True) -> RunResult | None:
    """Run ``recipe`` end to end; returns the run folder, the model and the metrics.

    Under ``torchrun`` with several processes, process 0 returns them; the others return ``None`` once
    training is over (they write nothing).
    """
    world = join(recipe.train.device)
    try:
        steady_large_blocks()
        if not world.is_main:
            logging.getLogger("coembed").setLevel(logging.WARNING)  # process 0 speaks for the run
            return _train(recipe, None, False, world)
        run_dir = make_run_dir(recipe, run_dir)
        handler = _attach_log_file(run_dir)
        try:
            return _train(recipe, run_dir, progress, world)
        finally:
            logging.getLogger("coembed").removeHandler(handler)
            handler.close()
    finally:
        leave(world)


def extraction_engine(extraction: ExtractionConfig) -> AbstractContextManager[ExtractionEngine]:
    """The engine ``extraction.engine`` names, as a context (the Ray engine joins or starts Ray on entering it).

    The Ray engine's module is imported here by name, the one place that loads it: only a recipe that asks for
    Ray needs it installed (:class:`RecipeError` otherwise, before any work).
    """
    if extraction.engine == "local":
        return nullcontext(LocalEngine(extraction.batch_size, extraction.num_workers))
    try:
        ray_extraction = importlib.import_module("coembed.ray_extraction")
    except ImportError as exc:
        raise RecipeError(f"extraction.engine: ray needs Ray installed: pip install 'coembed[ray]' ({exc})") from None
    engine: AbstractContextManager[ExtractionEngine] = ray_extraction.RayEngine(extraction.ray,
                                                                                 extraction.batch_size)
    return engine


def read_and_extract(recipe: Recipe, adapters: dict[str, Adapter], run_dir: Path | None, times: dict[str, float],
                     engine: AbstractContextManager[ExtractionEngine], progress: bool = True, world: World = SINGLE,
                     ) -> tuple[Dataset, dict[str, ModalityEmbeddings], list[dict[str, Any]], list[dict[str, Any]]]:
    """Stages 2 and 3: the source read and split, every trained modality extracted through the store with
    ``engine``; ``bad_items.jsonl`` written into ``run_dir`` (``None``: nothing written) and the bad-fraction
    rule applied after each; under several processes, process 0 releases the others once the store is complete.
    Returns the data set, the embeddings, the bad rows and the flagged rows."""
    # 2. data
    t = time.perf_counter()
    dataset = load_dataset(recipe, progress=progress)
    times["read"] = time.perf_counter() - t
    log.info("data: %d records (%d train, %d validation), %d bad", len(dataset.records), len(dataset.train),
             len(dataset.validation), len(dataset.bad))
    # fail before days of extraction when the source alone is already too bad (a lower bound of the final share)
    source_rows = bad_item_rows(dataset, {})
    if run_dir is not None:
        write_jsonl(run_dir / layout.BAD_ITEMS, source_rows)
    release_freed_memory()
    check_bad_fraction(source_rows, {m: sum(m in r.items for r in dataset.records) for m in recipe.trained_modalities()},
                       recipe.data.max_bad_fraction)

    # 3. extraction
    t = time.perf_counter()
    with engine as running:
        embedded = extract_dataset(recipe, adapters, dataset, progress, running)
    times["extract"] = time.perf_counter() - t
    if world.is_main:
        world.wait_for_main()  # the store is complete: the other processes read it now
    release_freed_memory()
    bad_rows = bad_item_rows(dataset, embedded)
    flagged_rows = [row for e in embedded.values() for row in e.flagged_rows()]
    if run_dir is not None:
        write_jsonl(run_dir / layout.BAD_ITEMS, bad_rows + flagged_rows)
    check_bad_fraction(bad_rows, {m: e.stats.items - e.stats.bad for m, e in embedded.items()},
                       recipe.data.max_bad_fraction)
    return dataset, embedded, bad_rows, flagged_rows


def _train(recipe: Recipe, run_dir: Path | None, progress: bool, world: World) -> RunResult | None:
    """The stages; ``run_dir`` is ``None`` on every process but 0, which writes nothing."""
    times: dict[str, float] = {}
    if run_dir is not None:
        (run_dir / layout.RECIPE).write_text(recipe.to_yaml())
        log.info("run folder %s", run_dir)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)

    # 1. encoders and heads: a missing download or a head that cannot map its encoder stops the run before any work
    t = time.perf_counter()
    # process 0 alone encodes; the others find every item in the store
    engine = extraction_engine(recipe.extraction if world.is_main else
                               recipe.extraction.model_copy(update={"engine": "local", "num_workers": 0}))
    adapters = build_adapters(recipe)
    if world.is_main:
        for m in recipe.trained_modalities():
            adapters[m].model
    times["load_encoders"] = time.perf_counter() - t
    heads = build_heads(recipe, adapters)
    if not world.is_main:
        world.wait_for_main()  # process 0 reads the source and fills the store; then this one reads both

    # 2. data and 3. extraction
    dataset, embedded, bad_rows, flagged_rows = read_and_extract(recipe, adapters, run_dir, times, engine, progress,
                                                                 world)

    # 4. training
    pairs = build_pair_sets(recipe, dataset, embedded, world=world)
    lost_records = sum(b.modality is None for b in dataset.bad)  # inputs that became no record: lost to every pair
    for p in pairs:
        candidates = sum(p.a in r.items and p.b in r.items for r in dataset.records)
        check_pair_fraction(bad_rows, (p.a, p.b), candidates + lost_records, p.n_train_total + p.n_val,
                            recipe.data.max_bad_fraction)
    pair_counts = {p.name: {"train": p.n_train_total, "validation": p.n_val} for p in pairs}
    record_counts = {"records": len(dataset.records), "train_records": len(dataset.train),
                     "validation_records": len(dataset.validation)}
    extraction_stats = {m: asdict(e.stats) for m, e in embedded.items()}
    # the figures' sample is of encoder vectors: saved now, and the records and lookups are not needed again.
    # Nothing of theirs stays alive (no id string either), so the memory they took goes back to the system.
    try:
        if run_dir is not None:
            build_figure_sample(recipe.eval, dataset, embedded, pairs, recipe.seed).save(run_dir / layout.FIGURE_SAMPLE)
    except Exception:  # the figures are optional; training goes on without them
        log.exception("saving the figures' sample failed; the run goes on without figures")
    dataset.train, dataset.validation = [], []
    del embedded
    release_freed_memory()
    t = time.perf_counter()
    trainer = build_fitter(recipe, heads, pairs, world)
    if run_dir is None:  # another process than 0: its part ends with training
        trainer.fit(progress=False)
        return None
    with (run_dir / layout.HISTORY).open("w", encoding="utf-8") as hist:
        def on_epoch(row: dict[str, float]) -> None:
            write_jsonl_row(hist, row)
            epoch_log.debug("epoch %d loss %.4f %s %.4f", row["epoch"], row.get("loss", float("nan")),
                            recipe.train.select_metric, row.get(recipe.train.select_metric, float("nan")))

        result = trainer.fit(on_epoch, progress=progress)
    times["train"] = time.perf_counter() - t

    head_configs: dict[str, HeadConfig] = {m: c.head for m, c in recipe.modalities.items()}
    output_dim = None
    if isinstance(trainer, Aligner):  # the method decided the heads (and maybe the shared space's dimension)
        head_configs.update(trainer.head_configs)
        output_dim = trainer.output_dim
    model = CoEmbedder.from_adapters(recipe.anchor, adapters, head_configs, output_dim=output_dim,
                                     metadata={"recipe": recipe.name, "method": recipe.train.method,
                                               "temperature": result.temperature,
                                               "pairs": [list(p) for p in recipe.pairs]})
    model.heads.load_state_dict(heads.state_dict())

    # 5. evaluation: every validation pair once, with the kept heads (the training tensors are not needed now)
    t = time.perf_counter()
    trainer.release_training_tensors()
    retrieval = trainer.final_metrics(result.best_metrics)
    zero_shot = run_recipe_zero_shot(recipe, model, run_dir, progress)
    times["evaluate"] = time.perf_counter() - t

    # 6. the result, saved before anything optional can fail
    metrics = RunMetrics(
        best_epoch=result.best_epoch, epochs_run=len(result.history), select_metric=recipe.train.select_metric,
        validation=result.best_metrics, retrieval=retrieval, zero_shot=zero_shot,
        validation_pairs=result.validation_pairs, validate_every=recipe.train.validate_every,
        final_loss=result.history[-1].get("loss") if result.history else None, temperature=result.temperature,
        counts=RunCounts(read=dataset.counts, **record_counts, bad_items=len(bad_rows),
                         bad_by_reason=count_reasons(bad_rows), flagged_items=len(flagged_rows),
                         flagged_by_reason=count_reasons(flagged_rows),
                         pairs=pair_counts),
        extraction=extraction_stats,
        seconds={**times, "total": sum(times.values())},
    )
    write_metrics(run_dir, metrics)
    model_dir = model.save_pretrained(run_dir / layout.MODEL_DIR, run_dir=run_dir)
    log.info("%s", format_summary(metrics))
    log.info("best epoch %d: %s", result.best_epoch, headline(result.best_metrics))

    # 7. best effort
    publish_run(recipe, run_dir, model, model_dir)
    log.info("wrote %s", run_dir)
    return RunResult(run_dir, model, metrics.model_dump(mode="json"), result.history)


@dataclass
class EmbedResult:
    run_dir: Path
    #: what ``extraction.json`` holds: per modality extraction statistics, counts, timings
    summary: dict[str, Any]


def embed_recipe(recipe: Recipe, run_dir: str | Path | None = None, progress: bool = True) -> EmbedResult:
    """``coembed embed``: the extraction stage of ``recipe`` alone, with ``extraction.engine``.

    Fills the embedding store and writes a folder (``<output_dir>/<name>-embed-<time>`` unless ``run_dir``) with
    the recipe, ``embed.log``, ``bad_items.jsonl`` and ``extraction.json``. With the Ray engine the encoders load in
    the cluster's actors only, never in this process.
    """
    run_dir = make_run_dir(recipe, run_dir, kind="embed")
    handler = _attach_log_file(run_dir, layout.EMBED_LOG)
    try:
        return _embed(recipe, run_dir, progress)
    finally:
        logging.getLogger("coembed").removeHandler(handler)
        handler.close()


def _embed(recipe: Recipe, run_dir: Path, progress: bool) -> EmbedResult:
    times: dict[str, float] = {}
    (run_dir / layout.RECIPE).write_text(recipe.to_yaml())
    log.info("embed folder %s", run_dir)
    t = time.perf_counter()
    engine = extraction_engine(recipe.extraction)
    adapters = build_adapters(recipe)
    if recipe.extraction.engine == "local":  # a missing download stops the run before any work
        for m in recipe.trained_modalities():
            adapters[m].model
    times["load_encoders"] = time.perf_counter() - t
    dataset, embedded, bad_rows, flagged_rows = read_and_extract(recipe, adapters, run_dir, times, engine, progress)
    summary = {
        "engine": recipe.extraction.engine,
        "counts": {"read": dataset.counts, "records": len(dataset.records), "bad_items": len(bad_rows),
                   "bad_by_reason": count_reasons(bad_rows), "flagged_items": len(flagged_rows),
                   "flagged_by_reason": count_reasons(flagged_rows)},
        "extraction": {m: asdict(e.stats) for m, e in embedded.items()},
        "seconds": {**times, "total": sum(times.values())},
    }
    write_json(run_dir / layout.EXTRACTION_SUMMARY, summary)
    counts = summary["counts"]
    log.info("%s", "\n".join(["summary", *extraction_lines(dataset.counts, summary["extraction"]),
                               *bad_item_lines(len(bad_rows), counts["bad_by_reason"], len(flagged_rows),
                                               counts["flagged_by_reason"])]))
    log.info("wrote %s", run_dir)
    return EmbedResult(run_dir, summary)


def run_recipe_zero_shot(recipe: Recipe, model: CoEmbedder, run_dir: Path,
                         progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every ``eval.zero_shot`` set of a recipe, results saved into the run folder (figures come later).

    Returns the metrics by set name. A set that cannot be evaluated (missing
    data, too many bad items) is logged as an error and recorded as
    ``{"error": ...}``: the trained run stays complete.
    """
    out: dict[str, dict[str, Any]] = {}
    for config in recipe.eval.zero_shot:
        name = config.name or config.data.source
        try:
            result = run_zero_shot(model, config, extraction=recipe.extraction, base_dir=recipe.base_dir,
                                   progress=progress)
        except (RecipeError, AdapterError, TooManyBadItems, ValueError, OSError) as exc:
            log.error("zero-shot %s failed: %s", name, exc)
            out[name] = {"error": str(exc)}
            continue
        result.save(run_dir)
        out[name] = result.metrics
    return out


def publish_run(recipe: Recipe, run_dir: Path, model: CoEmbedder, model_dir: Path) -> None:
    """The optional end of ``coembed train``: the figures (``eval.plots``, from the sample saved before
    training), the model card again with them, and ``report.md`` (``eval.report``). Each step that fails is logged with
    the command that redoes it; none can undo the saved model and metrics."""
    def attempt(what: str, redo: str, step: Any) -> bool:
        try:
            step()
            return True
        except Exception:  # a figure or a report is never worth a finished run
            log.exception("%s failed; the model and metrics are saved. Redo it with `%s %s`", what, redo, run_dir)
            return False

    def figures() -> None:
        if recipe.eval.plots:
            paths = draw_run_figures(run_dir, model=model)
            for result in load_results(run_dir):
                paths.append(plot_zero_shot(result, run_dir))
            log.info("figures: %s", ", ".join(p.name for p in paths))

    def card() -> None:  # the card shows the figures, which exist only now
        copy_record(run_dir, model_dir)
        write_model_card(model_dir, model.folder_config())

    if attempt("drawing the figures", "coembed plot", figures) and recipe.eval.plots:
        attempt("adding the figures to the model card", "coembed push", card)
    if recipe.eval.report:
        attempt("writing the report", "coembed report", lambda: log.info("report: %s", write_report(run_dir)))
