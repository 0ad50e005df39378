"""``report.md``: one readable page about a run, built from the run folder's files alone.

It reads ``recipe.yaml``, ``metrics.json``, the figures (``training-curve.png``,
``umap-*.png``) and the zero-shot results (``zeroshot-*.json`` with their
confusion matrices) and writes the data counts, the training curve, the
retrieval and zero-shot tables with their chance levels, the figures and the
recipe. ``coembed report RUN`` rewrites it, e.g. after ``coembed eval zero-shot RUN``.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from coembed.evaluation import RECALL_KS
from coembed.plots import TRAINING_CURVE
from coembed.zeroshot import TOP_K, ZeroShotResult

if TYPE_CHECKING:
    from coembed.data import Dataset
    from coembed.model import CoEmbedder
    from coembed.recipe import Recipe
    from coembed.run import Embedded
    from coembed.training import PairSet

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"

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


def _directions(metrics: dict[str, float], prefix: str = "") -> list[str]:
    """Directions (``"audio->image"``) holding ``<direction>/<prefix>R@1``."""
    out = []
    for key in metrics:
        direction, _, rest = key.partition("/")
        if "->" in direction and rest == f"{prefix}R@1" and direction not in out:
            out.append(direction)
    return out


def retrieval_rows(metrics: dict[str, float], level: str = "") -> list[list[str]]:
    """One table row per direction: R@k (chance), median rank, mAP (chance); ``level`` is ``""`` or ``"class/"``."""
    rows = []
    for d in _directions(metrics, level):
        values = {key[len(f"{d}/{level}"):]: v for key, v in metrics.items() if key.startswith(f"{d}/{level}")}
        rows.append([d] + [_with_chance(values.get(f"R@{k}"), values.get(f"chance/R@{k}")) for k in RECALL_KS]
                    + [_fmt(values.get("median_rank"), 1), _with_chance(values.get("mAP"), values.get("chance/mAP"))])
    return rows


def _section_data(metrics: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    counts = metrics.get("counts", {})
    data = recipe.get("data") or {}
    where = data.get("path") or data.get("dataset") or ""
    lines = ["## Data", "", f"Source: `{data.get('source', 'manifest')}`" + (f" ({where})" if where else "") + ".", ""]
    split = (data.get("split") or {}).get("validation")
    rows = [["records", str(counts.get("records", "–"))],
            ["training records", str(counts.get("train_records", "–"))],
            ["validation records" + (f" ({split:.0%} of groups)" if isinstance(split, float) else ""),
             str(counts.get("validation_records", "–"))]]
    for name, p in (counts.get("pairs") or {}).items():
        rows.append([f"{name} pairs (train / validation)", f"{p['train']} / {p['validation']}"])
    rows.append(["bad items (skipped)", str(counts.get("bad_items", "–"))])
    for reason, n in sorted((counts.get("bad_by_reason") or {}).items(), key=lambda kv: -kv[1]):
        rows.append([f"&nbsp;&nbsp;{reason}", str(n)])
    if counts.get("flagged_items"):
        rows.append(["flagged items (kept)", str(counts["flagged_items"])])
    lines += _table(["", "count"], rows)
    lines += ["", "Every skipped item is listed with its reason in `bad_items.jsonl`.", ""]
    return lines


def _section_training(run_dir: Path, metrics: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    train = recipe.get("train") or {}
    lines = ["## Training", ""]
    if (run_dir / TRAINING_CURVE).is_file():
        lines += [f"![training curve]({TRAINING_CURVE})", "",
                  "Left: the training loss per epoch. Right: validation R@1 per direction; the dashed line marks "
                  "the best epoch, whose heads were kept.", ""]
    seconds = metrics.get("seconds") or {}
    rows = [["epochs run", f"{metrics.get('epochs_run', '–')} of {train.get('epochs', '–')}"],
            ["best epoch", f"{metrics.get('best_epoch', '–')} (by `{metrics.get('select_metric', '–')}`)"],
            ["final training loss", _fmt(metrics.get("final_loss"), 4)],
            ["temperature", _fmt(metrics.get("temperature"), 4)],
            ["batch size, learning rate", f"{train.get('batch_size', '–')}, {train.get('lr', '–')}"],
            ["seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "–"]]
    return lines + _table(["", ""], rows) + [""]


def retrieval_tables(metrics: dict[str, float]) -> list[str]:
    """Markdown tables of instance-level and (when present) class-level retrieval, with chance levels."""
    header = ["query → gallery"] + [f"R@{k} (chance)" for k in RECALL_KS] + ["median rank", "mAP (chance)"]
    rows = retrieval_rows(metrics)
    if not rows:
        return []
    lines = _table(header, rows) + [""]
    class_rows = retrieval_rows(metrics, "class/")
    if class_rows:
        lines += ["Class-level retrieval (a hit is any item of the query's class):", ""]
        lines += _table(header, class_rows) + [""]
    return lines


def _section_retrieval(metrics: dict[str, Any]) -> list[str]:
    tables = retrieval_tables(metrics.get("retrieval") or metrics.get("validation") or {})
    lines = ["## Retrieval", "", "On the held-out validation split, with the heads of the best epoch.", ""]
    if not tables:
        return lines + ["No retrieval metrics (too few validation pairs).", ""]
    return lines + tables + [METRIC_NOTES, ""]


def _section_zero_shot(run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    results = [ZeroShotResult.load(p) for p in sorted(run_dir.glob("zeroshot-*.json"))]
    errors = {k: v["error"] for k, v in (metrics.get("zero_shot") or {}).items()
              if isinstance(v, dict) and "error" in v}
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
    figures = sorted(run_dir.glob("umap-*.png"))
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
    from coembed import __version__

    run_dir = Path(run_dir)
    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").is_file() else ""
    recipe = yaml.safe_load(recipe_text) or {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    modalities = recipe.get("modalities") or {}
    anchor = recipe.get("anchor", "?")
    pairs = ", ".join("-".join(p) for p in recipe.get("pairs") or [])
    heads = ", ".join(f"{m} (`{(c or {}).get('adapter', '?')}`, {((c or {}).get('head') or {}).get('type', 'linear')} "
                      "head)" for m, c in modalities.items())
    lines = [f"# Run `{recipe.get('name', run_dir.name)}`", "",
             f"Projection heads trained on {pairs or '?'} pairs into the shared space of **{anchor}**. "
             f"Modalities: {heads}. Frozen encoders; only the heads were trained.", "",
             f"Report written {datetime.now():%Y-%m-%d %H:%M} by coembed {__version__} from the files of "
             f"`{run_dir.name}`.", ""]
    lines += _section_data(metrics, recipe)
    lines += _section_training(run_dir, metrics, recipe)
    lines += _section_retrieval(metrics)
    lines += _section_zero_shot(run_dir, metrics)
    lines += _section_figures(run_dir)
    lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", "",
              "## Files", "",
              "`recipe.yaml` the recipe as run · `metrics.json` every number above · `history.jsonl` one line per "
              "epoch · `bad_items.jsonl` skipped items and why · `train.log` the log · `model/` the trained model "
              "(`CoEmbedder.from_pretrained`) · `embeddings/figure_sample.safetensors` the figures' sample "
              "(`coembed plot` redraws them)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` into the run folder; returns its path."""
    path = Path(run_dir) / REPORT_NAME
    path.write_text(render_report(run_dir), encoding="utf-8")
    return path


def publish_run(recipe: "Recipe", run_dir: Path, dataset: "Dataset", embedded: dict[str, "Embedded"],
                pairs: list["PairSet"], model: "CoEmbedder") -> None:
    """The end of ``coembed train``: save the figure sample, draw the figures (``eval.plots``) and
    write ``report.md`` (``eval.report``). A figure that fails is logged; the run stays complete."""
    from coembed.plots import SAMPLE_PATH, build_figure_sample, draw_run_figures

    build_figure_sample(recipe.eval, dataset, embedded, pairs, recipe.seed).save(run_dir / SAMPLE_PATH)
    if recipe.eval.plots:
        try:
            paths = draw_run_figures(run_dir, model=model)
            log.info("figures: %s", ", ".join(p.name for p in paths))
        except Exception:  # a figure is never worth a finished run
            log.exception("drawing the figures failed; redraw them with `coembed plot %s`", run_dir)
    if recipe.eval.report:
        log.info("report: %s", write_report(run_dir))
