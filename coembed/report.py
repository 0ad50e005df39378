"""``report.md``: one readable page about a run, built from the run folder's files alone.

It reads the training record (``recipe.yaml``, ``metrics.json``, through
:mod:`coembed.record`), the figures (``training-curve.png``, ``umap-*.png``)
and the zero-shot results (``zeroshot-*.json`` with their confusion matrices)
and writes the data counts, the training curve, the retrieval and zero-shot
tables with their chance levels, the figures and the recipe. ``coembed report
RUN`` rewrites it, as ``coembed eval zero-shot RUN`` and ``coembed eval
retrieval RUN`` do.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from coembed import layout
from coembed.metrics import CLASS_LEVEL, RECALL_KS, metric_table
from coembed.prompts import TOP_K
from coembed.record import RunMetrics, RunRecord, read_record
from coembed.sources import describe_data
from coembed.version import __version__
from coembed.zeroshot import load_results

#: Captions of the UMAP figures, by file-name prefix (``umap-<kind>-...``).
FIGURE_CAPTIONS = {
    "umap-encoder-": "{m} validation items in the {m} encoder's own space, coloured by class (the paper's Fig. 2a).",
    "umap-projected-": "The same {m} items after the trained head, in the shared space (Fig. 2b): class "
                       "separation that survives the projection.",
    "umap-coembedded-": "{m} in one shared space: a marker per modality, a colour per class (Fig. 3). Items of "
                        "one class should meet across modalities.",
    "umap-train-pairs-": "Random {m} training pairs: the two items of a pair share a colour and a line (Fig. 4).",
}

METRIC_NOTES = (
    "R@k: share of queries whose match is among the k most similar gallery items. median rank: of the first "
    "match. mAP: mean average precision over all of a query's matches. Ranks are pessimistic: an item that "
    "ties with the match ranks before it. Identical items count as one item (a caption shared by several clips "
    "matches each of them). In brackets: the exact expectation of a random ranking. Class-level: any item of "
    "the query's class is a match."
)


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: integers as they are, floats with ``digits`` decimals, anything else a dash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _with_chance(value: Any, chance: Any) -> str:
    return f"{_fmt(value)} ({_fmt(chance)})" if chance is not None else _fmt(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def retrieval_rows(metrics: dict[str, float], level: str = "") -> list[list[str]]:
    """One table row per direction: R@k (chance), median rank, mAP (chance); ``level`` is ``""`` or ``"class"``."""
    rows = []
    for direction, values in metric_table(metrics, level).items():
        if "R@1" not in values:
            continue
        rows.append([direction] + [_with_chance(values.get(f"R@{k}"), values.get(f"chance/R@{k}")) for k in RECALL_KS]
                    + [_fmt(values.get("median_rank"), 1), _with_chance(values.get("mAP"), values.get("chance/mAP"))])
    return rows


def _section_data(record: RunRecord) -> list[str]:
    counts = record.metrics.counts
    recipe = record.recipe
    lines = ["## Data", ""]
    if recipe is not None:
        data = describe_data(recipe.data)
        where = ", ".join(x for x in (data.location, data.split) if x)
        lines += [f"Source: `{data.source}`" + (f" ({where})" if where else "") + ".", ""]
    split = f" ({recipe.data.split.validation:.0%} of groups)" if recipe is not None else ""

    def count(value: int | None) -> str:
        return "–" if value is None else str(value)

    rows = [["records", count(counts.records)], ["training records", count(counts.train_records)],
            [f"validation records{split}", count(counts.validation_records)]]
    for name, p in counts.pairs.items():
        rows.append([f"{name} pairs (train / validation)", f"{p.train} / {p.validation}"])
    rows.append(["bad items (skipped)", count(counts.bad_items)])
    for reason, n in sorted(counts.bad_by_reason.items(), key=lambda kv: -kv[1]):
        rows.append([f"&nbsp;&nbsp;{reason}", str(n)])
    if counts.flagged_items:
        rows.append(["flagged items (kept)", str(counts.flagged_items)])
    lines += _table(["", "count"], rows)
    lines += ["", f"Every skipped item is listed with its reason in `{layout.BAD_ITEMS}`.", ""]
    return lines


def _section_training(record: RunRecord) -> list[str]:
    metrics, recipe = record.metrics, record.recipe
    lines = ["## Training", ""]
    train = recipe.train if recipe is not None else None
    closed_form = train is not None and train.method != "contrastive"
    if (record.folder / layout.TRAINING_CURVE).is_file():
        caption = ("Validation R@1 per direction for each setting tried (the x axis counts the settings, in the "
                   "order of `history.jsonl`; a closed-form fit has no training loss); the dashed line marks the "
                   "setting kept." if closed_form else
                   "Left: the training loss per epoch. Right: validation R@1 per direction; the dashed line marks "
                   "the best epoch, whose heads were kept.")
        lines += [f"![training curve]({layout.TRAINING_CURVE})", "", caption, ""]
    if closed_form:
        rows = [["method", f"`{train.method}`, fitted in closed form (no epochs, loss or temperature)"],
                ["settings tried", f"{_fmt(metrics.epochs_run)}, one per row of `{layout.HISTORY}` (the training "
                                   f"curve's x axis); kept: number {_fmt(metrics.best_epoch)} (by "
                                   f"`{metrics.select_metric or '–'}`)"],
                ["model selection on", _selection_text(metrics).replace(", every epoch", "")],
                ["seconds", ", ".join(f"{k} {v:.1f}" for k, v in metrics.seconds.items()) or "–"]]
        return lines + _table(["", ""], rows) + [""]
    rows = [["epochs run", f"{_fmt(metrics.epochs_run)} of {train.epochs if train else '–'}"],
            ["best epoch", f"{_fmt(metrics.best_epoch)} (by `{metrics.select_metric or '–'}`)"],
            ["model selection on", _selection_text(metrics)],
            ["final training loss", _fmt(metrics.final_loss, 4)],
            ["temperature", _fmt(metrics.temperature, 4)],
            ["batch size, learning rate", f"{train.batch_size}, {train.lr}" if train else "–"],
            ["seconds", ", ".join(f"{k} {v:.1f}" for k, v in metrics.seconds.items()) or "–"]]
    return lines + _table(["", ""], rows) + [""]


def _selection_text(metrics: RunMetrics) -> str:
    """Which validation pairs model selection ranked, and how often."""
    every = f", every {metrics.validate_every} epochs" if (metrics.validate_every or 1) > 1 else ", every epoch"
    sets = [f"{n['selection']} of {n['full']} {name} validation pairs" + (" (a sample drawn by group)"
            if n["selection"] < n["full"] else "") for name, n in metrics.validation_pairs.items()]
    return ("; ".join(sets) + every) if sets else "–"


def retrieval_tables(metrics: dict[str, float]) -> list[str]:
    """Markdown tables of instance-level and (when present) class-level retrieval, with chance levels."""
    header = ["query → gallery"] + [f"R@{k} (chance)" for k in RECALL_KS] + ["median rank", "mAP (chance)"]
    rows = retrieval_rows(metrics)
    if not rows:
        return []
    lines = _table(header, rows) + [""]
    class_rows = retrieval_rows(metrics, CLASS_LEVEL)
    if class_rows:
        lines += ["Class-level retrieval (a hit is any item of the query's class):", ""]
        lines += _table(header, class_rows) + [""]
    return lines


def _section_retrieval(record: RunRecord) -> list[str]:
    tables = retrieval_tables(record.metrics.headline_metrics)
    full = ", ".join(f"{n['full']} {name}" for name, n in record.metrics.validation_pairs.items())
    lines = ["## Retrieval", "", "On every pair of the held-out validation split" + (f" ({full})" if full else "")
             + ", ranked once with the heads of the best epoch.", ""]
    if not tables:
        return lines + ["No retrieval metrics (too few validation pairs).", ""]
    lines += tables + [METRIC_NOTES, ""]
    for name, metrics in record.metrics.retrieval_sets.items():
        other = retrieval_tables({k: v for k, v in metrics.items() if v is not None})
        if other:
            lines += [f"### {name}", "",
                      f"On other data (`coembed eval retrieval`; `{layout.retrieval_file(name)}` has the counts).", "",
                      *other]
    return lines


def _section_zero_shot(record: RunRecord) -> list[str]:
    run_dir = record.folder
    results = load_results(run_dir)
    errors = record.metrics.zero_shot_errors()
    if not results and not errors:
        return []
    lines = ["## Zero-shot classification", "",
             "Items embedded through their head are matched against every class name, put into prompt templates "
             "and embedded by the text side; the templates of a class are averaged. A hit at top-k when the true "
             "class is among the k most similar (ties count against). Chance: a uniform guess (1 / classes); "
             "majority: always answering the most frequent class.", ""]
    header = ["set", "items → prompts", "items", "classes", "top-1 (chance, majority)", f"top-{TOP_K} (chance)",
              "mean per-class top-1"]
    rows = []
    for r in results:
        m = r.metrics
        rows.append([r.name, f"{r.modality} → {r.text_modality}", str(int(m["items"])), str(int(m["classes"])),
                     f"{_fmt(m['top1'])} ({_fmt(m['chance/top1'])}, {_fmt(m['majority/top1'])})",
                     _with_chance(m[f"top{TOP_K}"], m[f"chance/top{TOP_K}"]), _fmt(m["mean_per_class_top1"])])
    if rows:
        lines += _table(header, rows) + [""]
    for name, error in errors.items():
        lines += [f"**{name}** failed: {error}", ""]
    for r in results:
        options = ", ".join(f"{k}={v}" for k, v in r.data.items() if k != "source")
        lines += [f"### {r.name}", "",
                  f"Data: `{r.data.get('source')}`" + (f" ({options})" if options else "")
                  + f"; {r.counts.get('items', '–')} items used, {r.counts.get('bad_items', 0)} bad, "
                  f"{r.counts.get('unlabelled', 0)} without a label.", "",
                  "Templates: " + ", ".join(f"`{t}`" for t in r.templates), ""]
        if (run_dir / r.figure_name).is_file():
            lines += [f"![confusion matrix of {r.name}]({r.figure_name})", ""]
        ranked = sorted(r.per_class.items(), key=lambda kv: (-kv[1]["top1"], kv[0]))
        if len(ranked) > 30:
            ranked = ranked[:10] + ranked[-10:]
            lines += ["The 10 best and the 10 worst classes:", ""]
        lines += _table(["class", "items", "top-1", f"top-{TOP_K}"],
                        [[c, str(int(v["n"])), _fmt(v["top1"]), _fmt(v[f"top{TOP_K}"])] for c, v in ranked]) + [""]
    return lines


def _section_figures(run_dir: Path) -> list[str]:
    figures = sorted(run_dir.glob(layout.FIGURE_GLOB))
    if not figures:
        return []
    lines = ["## Embedding figures", "",
             "UMAP projections (cosine metric) of a sample of validation items and training pairs; "
             "a class keeps its colour in every figure.", ""]
    for prefix, caption in FIGURE_CAPTIONS.items():  # in the paper's order
        for path in figures:
            if path.name.startswith(prefix):
                subject = path.name[len(prefix):-len(".png")].replace("-", " and ")
                lines += [f"![{path.name}]({path.name})", "", caption.format(m=subject), ""]
    return lines


def render_report(run_dir: Path) -> str:
    """The Markdown text of a run's report."""
    record = read_record(Path(run_dir))
    recipe = record.recipe
    if recipe is not None:
        pairs = ", ".join("-".join(p) for p in recipe.pairs)
        if recipe.train.method == "contrastive":
            heads = ", ".join(f"{m} (`{c.adapter}`, {c.head.type} head)" for m, c in recipe.modalities.items())
            about = (f"Projection heads trained on {pairs} pairs into the shared space of **{recipe.anchor}**. "
                     f"Modalities: {heads}. Frozen encoders; only the heads were trained.")
        else:
            adapters = ", ".join(f"{m} (`{c.adapter}`)" for m, c in recipe.modalities.items())
            about = (f"Heads fitted by `train.method: {recipe.train.method}` on {pairs} pairs into the shared "
                     f"space of **{recipe.anchor}** (their types are in `model/{layout.MODEL_CONFIG}`). "
                     f"Modalities: {adapters}. Frozen encoders.")
    else:
        about = f"No readable `{layout.RECIPE}` in this folder."
    lines = [f"# Run `{record.name}`", "", about, "",
             f"Report written {datetime.now():%Y-%m-%d %H:%M} by coembed {__version__} from the files of "
             f"`{record.folder.name}`.", ""]
    lines += _section_data(record)
    lines += _section_training(record)
    lines += _section_retrieval(record)
    lines += _section_zero_shot(record)
    lines += _section_figures(record.folder)
    lines += ["## Recipe", "", "```yaml", record.recipe_text.rstrip(), "```", "",
              "## Files", "",
              f"`{layout.RECIPE}` the recipe as run · `{layout.METRICS}` every number above · `{layout.HISTORY}` one "
              f"line per epoch · `{layout.BAD_ITEMS}` skipped items and why · `{layout.TRAIN_LOG}` the log · "
              f"`{layout.MODEL_DIR}/` the trained model (`CoEmbedder.from_pretrained`) · `{layout.FIGURE_SAMPLE}` "
              "the figures' sample (`coembed plot` redraws them)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` into the run folder; returns its path."""
    path = Path(run_dir) / layout.REPORT
    path.write_text(render_report(run_dir), encoding="utf-8")
    return path
