"""Figures: UMAP views of the embedding spaces, the training curve and confusion matrices.

The UMAP figures reproduce the paper's Figures 2 to 4 on any run:

* ``umap-encoder-<m>.png``: one modality in its own encoder space, coloured by class (Fig. 2a);
* ``umap-projected-<m>.png``: the same items after the head, in the shared space (Fig. 2b);
* ``umap-coembedded-<a>-<b>.png``: two modalities in one UMAP, a marker per modality
  and a colour per class (Fig. 3);
* ``umap-train-pairs-<a>-<b>.png``: random training pairs, each pair in one colour (Fig. 4).

They are written to the run folder itself, beside ``training-curve.png``; the
``umap-*.png`` names are the ones a model card shows (:mod:`coembed.model.card`).

The figures of a run are drawn from a small sample the run saves
(:class:`FigureSample`, ``embeddings/figure_sample.safetensors``: encoder
vectors, ids and labels, no pickle) and the heads in ``model/``, so
``coembed plot RUN`` redraws them from the run folder alone. Figures are drawn
with matplotlib's Agg renderer (no display, no pyplot state) and written as
PNG. A class keeps its colour in every figure of a run. The confusion matrix of
a zero-shot result is drawn here too (:func:`plot_zero_shot`).

matplotlib and umap-learn are imported by the functions that draw (umap takes
seconds to import), so a run with ``eval.plots: false`` never loads them.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from coembed import layout
from coembed.config import EvalConfig
from coembed.dataset import Dataset
from coembed.extraction import ModalityEmbeddings
from coembed.metrics import MetricKey, lower_is_better
from coembed.model import CoEmbedder
from coembed.record import read_record
from coembed.training import PairSet
from coembed.zeroshot import ZeroShotResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SAMPLE_FORMAT = "coembed-figure-sample/1"
UNLABELLED = "(no label)"
MARKERS = ("o", "^", "s", "D", "P", "X", "v", "*")
DPI = 150


# ---------------------------------------------------------------------------------------
# the saved sample
# ---------------------------------------------------------------------------------------


@dataclass
class FigureSample:
    """Encoder vectors of labelled validation items and of random training pairs.

    ``vectors[m]`` holds the rows of modality ``m`` for the records ``ids[m]``
    whose classes are ``labels[m]``; ``train_pairs["a-b"]`` holds the encoder
    vectors of both sides of a few training pairs.
    """

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    train_pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted({x for labels in self.labels.values() for x in labels})

    def save(self, path: Path) -> Path:
        tensors = {f"validation/{m}": np.ascontiguousarray(v, dtype=np.float32) for m, v in self.vectors.items()}
        for name, (a, b) in self.train_pairs.items():
            tensors[f"train_pairs/{name}/a"] = np.ascontiguousarray(a, dtype=np.float32)
            tensors[f"train_pairs/{name}/b"] = np.ascontiguousarray(b, dtype=np.float32)
        meta = {"format": SAMPLE_FORMAT, "ids": json.dumps(self.ids), "labels": json.dumps(self.labels),
                "pairs": json.dumps(self.pairs)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path) -> FigureSample:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run saved no figure sample (eval.plots was off?)")
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SAMPLE_FORMAT:
                raise ValueError(f"{path} is not a coembed figure sample ({meta.get('format')!r})")
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        pairs = [(str(a), str(b)) for a, b in json.loads(meta["pairs"])]
        return cls(
            vectors={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("validation/")},
            ids=json.loads(meta["ids"]), labels=json.loads(meta["labels"]), pairs=pairs,
            train_pairs={f"{a}-{b}": (arrays[f"train_pairs/{a}-{b}/a"], arrays[f"train_pairs/{a}-{b}/b"])
                         for a, b in pairs if f"train_pairs/{a}-{b}/a" in arrays},
        )


def figure_classes(labels: Sequence[str | None], wanted: int | list[str]) -> list[str]:
    """The classes a figure shows: the ``wanted`` names, or the ``wanted`` most frequent labels."""
    if isinstance(wanted, list):
        return list(wanted)
    counts = Counter(x for x in labels if x is not None)
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:wanted]]


def build_figure_sample(config: EvalConfig, dataset: Dataset, embedded: dict[str, ModalityEmbeddings],
                        pairs: list[PairSet], seed: int) -> FigureSample:
    """Pick the figure sample of a run: up to ``figure_items_per_class`` validation records
    of each figure class (records without labels count as one class) and ``figure_pairs``
    random training pairs per pair type."""
    rng = random.Random(seed)
    usable = [r for r in dataset.validation
              if any(m in embedded and embedded[m].ok_row(r.id) is not None for m in r.items)]
    labelled = any(r.label is not None for r in usable)
    label_of = {r.id: (r.label if labelled else UNLABELLED) for r in usable}
    classes = set(figure_classes([label_of[r.id] for r in usable], config.figure_classes))
    chosen: list[str] = []
    for c in sorted(classes):
        ids = [r.id for r in usable if label_of[r.id] == c]
        chosen += sorted(rng.sample(ids, min(len(ids), config.figure_items_per_class)))
    sample = FigureSample(pairs=[(p.a, p.b) for p in pairs])
    for m, e in embedded.items():
        rows = [(rid, row) for rid in chosen if (row := e.ok_row(rid)) is not None]
        if rows:
            sample.vectors[m] = e.lookup.gather([row for _, row in rows])
            sample.ids[m] = [rid for rid, _ in rows]
            sample.labels[m] = [str(label_of[rid]) for rid, _ in rows]
    for p in pairs:
        if p.train_rows is None:  # pair sets built by hand: their training tensors are all there is
            n = p.n_train
            picked = sorted(rng.sample(range(n), min(n, config.figure_pairs)))
            sample.train_pairs[p.name] = (p.train_a[picked].cpu().numpy(), p.train_b[picked].cpu().numpy())
            continue
        rows_a, rows_b = p.train_rows
        picked = sorted(rng.sample(range(len(rows_a)), min(len(rows_a), config.figure_pairs)))
        sample.train_pairs[p.name] = (embedded[p.a].lookup.gather(rows_a[picked]),
                                      embedded[p.b].lookup.gather(rows_b[picked]))
    return sample


# ---------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------


def umap_2d(vectors: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """A deterministic 2-D UMAP (cosine metric) of ``vectors``; ``n_neighbors`` shrinks for small sets."""
    n = len(vectors)
    if n < 3:
        raise ValueError(f"a UMAP figure needs at least 3 items, got {n}")
    import umap  # deferred: umap-learn takes seconds to import (numba)

    k = max(2, min(n_neighbors, n - 1))
    init = "spectral" if n > k + 1 else "random"  # the spectral layout needs more points than neighbours + 1
    reducer = umap.UMAP(n_neighbors=k, n_components=2, metric="cosine", random_state=seed, n_jobs=1, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny sets make UMAP warn about its own graph
        return np.asarray(reducer.fit_transform(np.asarray(vectors, dtype=np.float32)))


def class_colors(classes: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """A colour per class, fixed by the class's position in the sorted list."""
    from matplotlib import colormaps  # deferred with all of matplotlib: only drawing loads it

    names = sorted(classes)
    if len(names) <= 10:
        cmap = colormaps["tab10"]
        return {c: cmap(i) for i, c in enumerate(names)}
    if len(names) <= 20:
        cmap = colormaps["tab20"]
        return {c: cmap(i) for i, c in enumerate(names)}
    cmap = colormaps["turbo"]
    return {c: cmap(0.05 + 0.9 * i / (len(names) - 1)) for i, c in enumerate(names)}


def _figure(width: float = 7.5, height: float = 5.5) -> Figure:
    from matplotlib.figure import Figure  # deferred: see class_colors

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: "Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # a bare Figure renders with Agg
    return path


def _style_map(ax: "Axes", title: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])


def _class_legend(ax: "Axes", colors: dict[str, Any], shown: Sequence[str], modality_markers: dict[str, str]) -> None:
    from matplotlib.lines import Line2D  # deferred: see class_colors

    handles = [Line2D([], [], ls="", marker="o", ms=7, color=colors[c], label=c) for c in sorted(set(shown))]
    legend = ax.legend(handles=handles, title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       fontsize=8, title_fontsize=9, frameon=False, ncol=1 if len(handles) <= 20 else 2)
    if len(modality_markers) > 1:
        ax.add_artist(legend)
        marks = [Line2D([], [], ls="", marker=mk, ms=7, color="0.35", label=m) for m, mk in modality_markers.items()]
        ax.legend(handles=marks, title="modality", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8,
                  title_fontsize=9, frameon=False)


def plot_classes(points: np.ndarray, labels: Sequence[str], colors: dict[str, Any], title: str, path: Path,
                 modalities: Sequence[str] | None = None, markers: dict[str, str] | None = None) -> Path:
    """Scatter 2-D points coloured by class; with ``modalities``, one marker per modality."""
    modalities = list(modalities) if modalities is not None else ["items"] * len(points)
    markers = markers or {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(dict.fromkeys(modalities))}
    fig = _figure()
    ax = fig.add_subplot()
    labels = list(labels)
    for m, marker in markers.items():
        rows = [i for i, x in enumerate(modalities) if x == m]
        if rows:
            ax.scatter(points[rows, 0], points[rows, 1], c=[colors[labels[i]] for i in rows], marker=marker, s=36,
                       alpha=0.85, edgecolors="white", linewidths=0.4)
    _style_map(ax, title)
    _class_legend(ax, colors, labels, markers if len(set(modalities)) > 1 else {})
    return _save(fig, path)


def plot_pairs(points_a: np.ndarray, points_b: np.ndarray, name_a: str, name_b: str, markers: dict[str, str],
               title: str, path: Path) -> Path:
    """Pairs as two markers of one colour joined by a faint line (the paper's Figure 4)."""
    from matplotlib import colormaps  # deferred: see class_colors
    from matplotlib.lines import Line2D

    n = len(points_a)
    cmap = colormaps["tab20" if n <= 20 else "turbo"]
    colors = [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]
    fig = _figure()
    ax = fig.add_subplot()
    for i in range(n):
        ax.plot([points_a[i, 0], points_b[i, 0]], [points_a[i, 1], points_b[i, 1]], color=colors[i], lw=0.8,
                alpha=0.45)
    ax.scatter(points_a[:, 0], points_a[:, 1], c=colors, marker=markers[name_a], s=44, edgecolors="white",
               linewidths=0.4)
    ax.scatter(points_b[:, 0], points_b[:, 1], c=colors, marker=markers[name_b], s=44, edgecolors="white",
               linewidths=0.4)
    _style_map(ax, title)
    handles = [Line2D([], [], ls="", marker=markers[m], ms=7, color="0.35", label=m) for m in (name_a, name_b)]
    ax.legend(handles=handles, title=f"{n} pairs, one colour each", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, title_fontsize=9, frameon=False)
    return _save(fig, path)


def _series(history: list[dict[str, Any]], key: str) -> np.ndarray:
    """The values of ``key`` over the epochs; NaN where an epoch has none (``null`` in history.jsonl)."""
    return np.array([np.nan if row.get(key) is None else row[key] for row in history], dtype=float)


def plot_history(history: list[dict[str, float]], select_metric: str, path: Path) -> Path:
    """Training loss and validation R@1 (every direction, and the selection metric) per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = _figure(10.0, 4.0)
    loss_ax, val_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, _series(history, "loss"), color="tab:blue", marker="." if len(epochs) < 40 else None)
    loss_ax.set_title("training loss (summed over pair types)", fontsize=10)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    keys = [k for k in history[0] if (p := MetricKey.parse(k)) is not None and not p.level and not p.chance
            and p.name == "R@1"] if history else []
    for key in keys:
        val_ax.plot(epochs, _series(history, key), label=key, lw=1.2)
    if select_metric not in keys and history and select_metric in history[0]:
        val_ax.plot(epochs, _series(history, select_metric), label=select_metric, color="black", lw=1.2,
                    ls=":")
    if history and select_metric in history[0]:
        values = _series(history, select_metric)
        if not np.all(np.isnan(values)):
            best = int(np.nanargmin(values) if lower_is_better(select_metric) else np.nanargmax(values))
            for ax in (loss_ax, val_ax):
                ax.axvline(epochs[best], color="0.5", ls="--", lw=0.8)
            right_half = best >= len(epochs) / 2
            val_ax.annotate(f"best epoch {epochs[best]} ", (epochs[best], 0.02), xycoords=("data", "axes fraction"),
                            fontsize=8, color="0.3", ha="right" if right_half else "left")
    val_ax.set_title(f"validation retrieval (best epoch by {select_metric})", fontsize=10)
    val_ax.set_xlabel("epoch")
    val_ax.set_ylabel("validation metric")
    if val_ax.lines:
        val_ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], title: str,
                   path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted); class names up to 60 classes."""
    matrix = np.asarray(matrix, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(classes)
    size = min(4.0 + 0.22 * n, 22.0)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= 60:
        ticks = np.arange(n)
        font = 9 if n <= 15 else 7 if n <= 30 else 5
        ax.set_xticks(ticks, list(classes), rotation=90, fontsize=font)
        ax.set_yticks(ticks, list(classes), fontsize=font)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.5 else "black")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# the figures of a run
# ---------------------------------------------------------------------------------------


def _subset(sample: FigureSample, m: str, classes: set[str] | None) -> tuple[np.ndarray, list[str]]:
    rows = [i for i, x in enumerate(sample.labels[m]) if classes is None or x in classes]
    return sample.vectors[m][rows], [sample.labels[m][i] for i in rows]


def draw_sample_figures(model: CoEmbedder, sample: FigureSample, out_dir: Path, seed: int = 0,
                        n_neighbors: int = 15, classes: Sequence[str] | None = None) -> list[Path]:
    """Figures 2 to 4 for every modality and pair type of ``sample``; returns the PNG paths.

    ``classes`` restricts the class-coloured figures to those classes of the sample.
    """
    keep = set(classes) if classes else None
    if keep is not None and (unknown := keep - set(sample.classes)):
        raise ValueError(f"classes not in the figure sample: {sorted(unknown)}; it has: {', '.join(sample.classes)}")
    colors = class_colors(sample.classes)
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(model.modalities)}
    anchor_key = model.specs[model.anchor].adapter
    written: list[Path] = []

    def projected(m: str, vectors: np.ndarray) -> np.ndarray:
        return model.project(m, torch.from_numpy(vectors)).cpu().numpy()

    def skip(name: str, n: int) -> bool:
        if n < 3:
            log.warning("figure %s skipped: %d items (3 or more needed)", name, n)
            return True
        return False

    for m in sample.vectors:
        vectors, labels = _subset(sample, m, keep)
        if skip(f"encoder-{m}", len(vectors)):
            continue
        spec = model.specs[m]
        written.append(plot_classes(umap_2d(vectors, seed, n_neighbors), labels, colors,
                                    f"{m} in its own encoder space ({spec.adapter}, {spec.input_dim}-d)",
                                    out_dir / f"umap-encoder-{m}.png"))
        if spec.head.type != "identity":
            written.append(plot_classes(umap_2d(projected(m, vectors), seed, n_neighbors), labels, colors,
                                        f"{m} after its {spec.head.type} head, in the shared "
                                        f"{model.anchor} space ({anchor_key})", out_dir / f"umap-projected-{m}.png"))
    for a, b in sample.pairs:
        if a not in sample.vectors or b not in sample.vectors:
            continue
        va, la = _subset(sample, a, keep)
        vb, lb = _subset(sample, b, keep)
        if not skip(f"coembedded-{a}-{b}", len(va) + len(vb)):
            points = umap_2d(np.concatenate([projected(a, va), projected(b, vb)]), seed, n_neighbors)
            written.append(plot_classes(points, la + lb, colors, f"{a} and {b} co-embedded in the shared space",
                                        out_dir / f"umap-coembedded-{a}-{b}.png", [a] * len(va) + [b] * len(vb),
                                        {a: markers[a], b: markers[b]}))
    for a, b in sample.pairs:
        if f"{a}-{b}" not in sample.train_pairs:
            continue
        ta, tb = sample.train_pairs[f"{a}-{b}"]
        if skip(f"train-pairs-{a}-{b}", 2 * len(ta)):
            continue
        points = umap_2d(np.concatenate([projected(a, ta), projected(b, tb)]), seed, n_neighbors)
        written.append(plot_pairs(points[:len(ta)], points[len(ta):], a, b, markers,
                                  f"random {a}-{b} training pairs in the shared space",
                                  out_dir / f"umap-train-pairs-{a}-{b}.png"))
    return written


def plot_zero_shot(result: ZeroShotResult, folder: Path) -> Path:
    """The confusion matrix of a zero-shot result, as ``zeroshot-<name>-confusion.png`` in ``folder``."""
    return plot_confusion(result.confusion, result.classes, result.title, folder / result.figure_name)


def draw_run_figures(run_dir: Path, seed: int | None = None, n_neighbors: int | None = None,
                     classes: Sequence[str] | None = None, model: CoEmbedder | None = None) -> list[Path]:
    """Every figure of a run folder (UMAP figures and the training curve), written into it.

    ``seed`` and ``n_neighbors`` default to the run's recipe (``seed``, ``eval.umap_neighbors``);
    ``model`` defaults to the run's saved model.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    recipe = record.recipe
    seed = (recipe.seed if recipe is not None else 0) if seed is None else seed
    if n_neighbors is None:
        n_neighbors = recipe.eval.umap_neighbors if recipe is not None else EvalConfig().umap_neighbors
    written: list[Path] = []
    if record.history:
        select = recipe.train.select_metric if recipe is not None else (record.metrics.select_metric or "mean_r1")
        written.append(plot_history(record.history, select, run_dir / layout.TRAINING_CURVE))
    if model is None:
        model = CoEmbedder.from_pretrained(run_dir / layout.MODEL_DIR, device="cpu")
    sample = FigureSample.load(run_dir / layout.FIGURE_SAMPLE)
    written += draw_sample_figures(model, sample, run_dir, seed, n_neighbors, classes)
    return written
