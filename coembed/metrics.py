"""Retrieval metrics: ranking, recall, mAP, chance levels, and the grammar of metric keys.

Every metric here comes from one ranking engine, :func:`rank_gallery`: each
query ranks the whole gallery by cosine similarity, and a gallery item is
*relevant* to a query when their labels are equal. Three uses share it:

* **paired retrieval**: row ``i`` of one modality is relevant to row ``i`` of
  the other. Duplicate items are one item: each direction ranks the distinct
  items of its gallery (the same raw content in a run, else an identical
  vector) for each distinct query, and pairs sharing an item on either side
  join one group (transitively) whose gallery items are all relevant, so an
  audio clip with five captions finds any of them (the AudioCaps convention)
  and a caption shared by a hundred clips is one gallery item, not a hundred.
* **class-level retrieval**: a hit when the labels (classes) match.
* **zero-shot classification** (:mod:`coembed.zeroshot`): the gallery is one
  text embedding per class.

Conventions, exact and documented in ``docs/evaluation.md``:

* Ranks are 1-based and **pessimistic**: a non-relevant item that ties with a
  relevant one ranks before it, so a constant model never looks good. Scores
  closer than :data:`TIE_TOLERANCE` count as tied (float rounding makes the
  similarities of identical vectors differ in the last bits).
* ``R@k``: share of queries whose first relevant item ranks ``<= k``.
  ``median_rank`` and ``mrr`` use the same first rank. ``mAP``: mean over
  queries of the average precision over all of the query's relevant items.
* Chance levels are the exact expectations under a uniformly random ranking:
  ``R@k = 1 - C(N-m, k) / C(N, k)`` and ``AP = H_N/N + (m-1)(N-H_N)/(N(N-1))``
  for ``m`` relevant items among ``N`` (``k/N`` and ``H_N/N`` when ``m = 1``),
  averaged over queries.

Memory is bounded: similarities are computed in blocks of at most
``chunk_size x chunk_size`` (and ``chunk_size**2`` relevant scores), whatever
the gallery size, and the result is exact, not approximate.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

RECALL_KS = (1, 5, 10)

#: Cosine similarities closer than this are ties.
TIE_TOLERANCE = 1e-6

#: Up to this many relevant items per query their scores are gathered directly
#: (one pass over the gallery in all); more, and a first scan collects them.
_GATHER_MAX_RELEVANT = 8


def chunk_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` over ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@dataclass
class Ranking:
    """Per-query outcome of ranking a gallery (tensors of length ``n_queries``)."""

    first_rank: torch.Tensor          # long, 1-based rank of the best-ranked relevant item
    average_precision: torch.Tensor   # float
    n_relevant: torch.Tensor          # long, relevant items in the gallery
    gallery_size: int


def _count_at_least(scores: torch.Tensor, thresholds: torch.Tensor,
                    compare: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i, j]`` = number of entries of ``scores[i]`` that are ``>= thresholds[i, j]``.

    ``compare``: a bool buffer of at least ``scores.numel()`` values to compare into (no allocation per call).
    """
    if thresholds.shape[1] <= 4:
        out = compare.view(-1)[:scores.numel()].view(scores.shape) if compare is not None else None
        return torch.stack([torch.ge(scores, thresholds[:, j:j + 1], out=out).sum(dim=1)
                            for j in range(thresholds.shape[1])], dim=1)
    ascending = scores.sort(dim=1).values.contiguous()
    return scores.shape[1] - torch.searchsorted(ascending, thresholds.contiguous(), right=False)


def _block(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view at the start of a flat buffer."""
    return buffer[:rows * cols].view(rows, cols)


def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, query_labels: torch.Tensor,
                 gallery_labels: torch.Tensor, chunk_size: int = 1024, normalized: bool = False) -> Ranking:
    """Rank ``gallery`` for every query by cosine similarity; relevant means equal labels.

    Labels are non-negative integers. Every query needs at least one relevant
    gallery item. See the module docstring for the tie convention; memory is
    ``O(chunk_size**2)`` floats besides the inputs (``normalized``: the rows are
    unit float32 vectors already, and no normalised copy is made).
    """
    if queries.shape[0] != query_labels.shape[0] or gallery.shape[0] != gallery_labels.shape[0]:
        raise ValueError("one label per query and per gallery item is needed")
    device = queries.device
    q = _unit(queries, normalized)
    g = _unit(gallery.to(device), normalized)
    ql = query_labels.to(device=device, dtype=torch.long)
    gl = gallery_labels.to(device=device, dtype=torch.long)
    n_q, n_g = q.shape[0], g.shape[0]
    counts = torch.bincount(gl, minlength=int(ql.max()) + 1 if n_q else 0) if n_g else gl.new_zeros(0)
    n_relevant = counts[ql] if n_q else ql.new_zeros(0)
    if n_q and (n_g == 0 or bool((n_relevant == 0).any())):
        raise ValueError("a query has no relevant gallery item")
    by_label = torch.argsort(gl, stable=True)           # gallery rows grouped by label
    label_start = torch.cumsum(counts, 0) - counts
    first = torch.empty(n_q, dtype=torch.long, device=device)
    ap = torch.empty(n_q, dtype=torch.float32, device=device)
    max_m = int(n_relevant.max()) if n_q else 1
    q_step = max(1, min(chunk_size, chunk_size * chunk_size // max_m))
    block = min(q_step, max(n_q, 1)) * min(chunk_size, max(n_g, 1))
    sims_buffer = torch.empty(block, device=device)
    same_buffer = torch.empty(block, dtype=torch.bool, device=device)
    compare_buffer = torch.empty(block, dtype=torch.bool, device=device)
    for qs in chunk_slices(n_q, q_step):
        m = n_relevant[qs]
        width = int(m.max())
        rows_n = qs.stop - qs.start
        # pass 1: every relevant score of each query, padded with -inf
        if width <= _GATHER_MAX_RELEVANT:  # few relevant items (paired retrieval): score them directly
            offset = torch.arange(width, device=device)
            pad = offset[None, :] >= m[:, None]
            rows_of = by_label[(label_start[ql[qs]][:, None] + offset[None, :]).clamp(max=n_g - 1)]
            relevant = torch.stack([(q[qs] * g[rows_of[:, w]]).sum(dim=1) for w in range(width)], dim=1)
            relevant = relevant.masked_fill(pad, float("-inf"))
        else:  # many (class-level retrieval): collect them while scanning the gallery
            relevant = torch.full((rows_n, width), float("-inf"), device=device)
            filled = torch.zeros(rows_n, dtype=torch.long, device=device)
            for gs in chunk_slices(n_g, chunk_size):
                sims = q[qs] @ g[gs].T
                mask = ql[qs, None] == gl[None, gs]
                rows, cols = mask.nonzero(as_tuple=True)
                position = filled[rows] + (mask.long().cumsum(dim=1) - 1)[rows, cols]
                relevant[rows, position] = sims[rows, cols]
                filled += mask.sum(dim=1)
        relevant = relevant.sort(dim=1, descending=True).values
        # pass 2: non-relevant items scoring at least each relevant score (ties count against); the blocks
        # reuse three buffers, so scanning a gallery allocates nothing per block
        above = torch.zeros(rows_n, width, dtype=torch.long, device=device)
        thresholds = relevant - TIE_TOLERANCE
        for gs in chunk_slices(n_g, chunk_size):
            cols = gs.stop - gs.start
            sims = torch.mm(q[qs], g[gs].T, out=_block(sims_buffer, rows_n, cols))
            same = torch.eq(ql[qs, None], gl[None, gs], out=_block(same_buffer, rows_n, cols))
            sims.masked_fill_(same, float("-inf"))
            above += _count_at_least(sims, thresholds, compare_buffer)
        j = torch.arange(1, width + 1, device=device)
        ranks = above + j                                   # rank of the j-th best relevant item
        valid = j[None, :] <= m[:, None]
        first[qs] = ranks[:, 0]
        ap[qs] = ((j / ranks) * valid).sum(dim=1) / m
    return Ranking(first, ap, n_relevant, n_g)


def _unit(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    return x if normalized and x.dtype == torch.float32 else F.normalize(x.float(), dim=-1)


def pair_ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Rank (1 = best, pessimistic) of ``gallery[i]`` among all gallery items for ``queries[i]``.

    Only ``gallery[i]`` is relevant (no duplicate grouping; see :func:`paired_retrieval`).
    """
    if queries.shape[0] != gallery.shape[0]:
        raise ValueError(f"paired retrieval needs as many queries as gallery items, "
                         f"got {queries.shape[0]} and {gallery.shape[0]}")
    labels = torch.arange(queries.shape[0])
    return rank_gallery(queries, gallery, labels, labels, chunk_size).first_rank


def recall_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k, median rank (the mean of the two middle ranks for an even count) and mean
    reciprocal rank from 1-based ranks."""
    r = ranks.float()
    out = {f"R@{k}": float((r <= k).float().mean()) for k in ks}
    out["median_rank"] = float(np.median(r.cpu().numpy())) if r.numel() else float("nan")
    out["mrr"] = float((1.0 / r).mean()) if r.numel() else float("nan")
    return out


def chance_recall(n_relevant: torch.Tensor, gallery_size: int, k: int) -> float:
    """Expected R@k of a uniformly random ranking: mean of ``1 - C(N-m, k) / C(N, k)``."""
    m = n_relevant.double().cpu()
    if m.numel() == 0:
        return float("nan")
    miss = torch.ones_like(m)
    for t in range(min(k, gallery_size)):
        miss = miss * ((gallery_size - m - t) / (gallery_size - t)).clamp(min=0.0)
    return float((1.0 - miss).mean())


def chance_average_precision(n_relevant: torch.Tensor, gallery_size: int) -> float:
    """Expected AP of a uniformly random ranking, averaged over queries (exact)."""
    m = n_relevant.double().cpu()
    if m.numel() == 0:
        return float("nan")
    n = gallery_size
    if n == 1:
        return 1.0
    harmonic = float(sum(1.0 / i for i in range(1, n + 1)))
    return float((harmonic / n + (m - 1) * (n - harmonic) / (n * (n - 1))).mean())


def ranking_metrics(ranking: Ranking, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """R@k, median rank, MRR and mAP of a ranking, with the random-ranking level of R@k and mAP."""
    out = recall_metrics(ranking.first_rank, ks)
    ap = ranking.average_precision
    out["mAP"] = float(ap.mean()) if ap.numel() else float("nan")
    for k in ks:
        out[f"chance/R@{k}"] = chance_recall(ranking.n_relevant, ranking.gallery_size, k)
    out["chance/mAP"] = chance_average_precision(ranking.n_relevant, ranking.gallery_size)
    return out


def ranking_metric_names(ks: tuple[int, ...] = RECALL_KS) -> list[str]:
    """The keys :func:`ranking_metrics` returns (``R@1``, ``mAP``, ``chance/mAP``, ...)."""
    one = torch.ones(1, dtype=torch.long)
    return list(ranking_metrics(Ranking(one, one.float(), one, 1), ks))


def encode_labels(labels: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """String labels -> integer ids (indices into the sorted class list) and that class list."""
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[x] for x in labels], dtype=torch.long), classes


def _key_ids(keys: torch.Tensor | Sequence[Hashable]) -> np.ndarray:
    """One integer per row: equal ids for identical tensor rows or equal keys."""
    if isinstance(keys, torch.Tensor):
        return torch.unique(keys.detach(), dim=0, return_inverse=True)[1].cpu().numpy()
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


@dataclass(frozen=True)
class Duplicates:
    """Which aligned pairs share items: for pair ``i``, the ids of its item on each side (equal ids:
    the same item) and its duplicate group (pairs linked by a shared item on either side, transitively)."""

    item_a: torch.Tensor
    item_b: torch.Tensor
    group: torch.Tensor

    def __len__(self) -> int:
        return int(self.group.shape[0])

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice) -> Duplicates:
        """The pairs at ``index`` (ids and groups keep their values)."""
        index = torch.as_tensor(index) if isinstance(index, np.ndarray) else index
        return Duplicates(self.item_a[index], self.item_b[index], self.group[index])

    def items(self, side: int) -> torch.Tensor:
        """The item ids of side 0 (``a``) or 1 (``b``)."""
        return self.item_a if side == 0 else self.item_b


def find_duplicates(keys_a: torch.Tensor | Sequence[Hashable],
                    keys_b: torch.Tensor | Sequence[Hashable]) -> Duplicates:
    """The identical items and duplicate groups of aligned pairs.

    An item is identified by its key (e.g. :func:`coembed.store.content_identity`
    of the raw item) or, given tensors, by its exact vector. Pairs that share an
    item on either side are one group, transitively (connected components of
    the pair graph), so a clip with several captions and a caption shared by
    several clips each form one group with everything they are linked to.
    """
    n = len(keys_a)
    if n != len(keys_b):
        raise ValueError(f"duplicate groups need aligned pairs, got {n} and {len(keys_b)} keys")
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return Duplicates(empty, empty, empty)
    ia, ib = _key_ids(keys_a), _key_ids(keys_b)
    n_a = int(ia.max()) + 1
    size = n_a + int(ib.max()) + 1
    graph = coo_matrix((np.ones(n), (ia, n_a + ib)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    return Duplicates(torch.from_numpy(ia).long(), torch.from_numpy(ib).long(), torch.from_numpy(component[ia]).long())


def distinct_rows(item_ids: torch.Tensor) -> torch.Tensor:
    """The position of the first row of every distinct id, in row order."""
    _, first = np.unique(item_ids.cpu().numpy(), return_index=True)
    return torch.from_numpy(np.sort(first)).long()


# ---------------------------------------------------------------------------------------
# metric keys: "<query>-><gallery>/[class/][chance/]<name>", written and parsed here only
# ---------------------------------------------------------------------------------------

#: The level of class-level retrieval in a metric key (a hit is any item of the query's class).
CLASS_LEVEL = "class"
CHANCE = "chance"
#: The mean instance-level R@1 over every direction.
MEAN_R1 = "mean_r1"
#: Values of a training history row besides the validation metrics.
TRAINING_VALUES = ("loss", "temperature", "seconds")


@dataclass(frozen=True)
class MetricKey:
    """The key of one retrieval metric: ``"<query>-><gallery>/[class/][chance/]<name>"``.

    ``"audio->image/R@1"`` is the instance-level R@1 of audio queries against
    the image gallery, ``"audio->image/class/mAP"`` the class-level mAP and
    ``"audio->image/chance/R@1"`` the R@1 a random ranking expects.
    """

    query: str
    gallery: str
    name: str
    level: str = ""
    chance: bool = False

    @property
    def direction(self) -> str:
        return f"{self.query}->{self.gallery}"

    @property
    def measure(self) -> str:
        """The metric within its level: ``"R@1"`` or ``"chance/R@1"``."""
        return f"{CHANCE}/{self.name}" if self.chance else self.name

    def __str__(self) -> str:
        return "/".join([self.direction, *([self.level] if self.level else []), self.measure])

    @classmethod
    def parse(cls, key: str) -> MetricKey | None:
        """The parts of ``key``; ``None`` for a key that is not a retrieval metric (``loss``, ``mean_r1``)."""
        direction, *rest = key.split("/")
        query, arrow, gallery = direction.partition("->")
        if not (arrow and query and gallery and rest):
            return None
        level = rest.pop(0) if len(rest) > 1 and rest[0] == CLASS_LEVEL else ""
        chance = len(rest) > 1 and rest[0] == CHANCE
        if chance:
            rest.pop(0)
        return cls(query, gallery, rest[0], level, chance) if len(rest) == 1 else None


def metric_table(metrics: dict[str, float], level: str = "") -> dict[str, dict[str, float]]:
    """``{direction: {measure: value}}`` of the retrieval metrics at ``level`` (``""`` or ``"class"``),
    in the order they appear; chance levels are the measures ``"chance/<name>"``."""
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parsed = MetricKey.parse(key)
        if parsed is not None and parsed.level == level:
            table.setdefault(parsed.direction, {})[parsed.measure] = value
    return table


def selectable_metrics(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Every value of an epoch's history row that ``train.select_metric`` may name, for these pair types.

    A direction's metrics are missing from an epoch whose pair type has fewer than 2
    validation pairs; the epoch then counts as having no value (NaN) for them.
    """
    names = [*TRAINING_VALUES, MEAN_R1]
    for a, b in pairs:
        names += [_key(q, g, measure) for q, g in ((a, b), (b, a)) for measure in ranking_metric_names()]
    return names


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (a metric or history key) is the better one."""
    return metric.endswith(("median_rank", "loss"))


def direction_r1(metrics: dict[str, float]) -> dict[str, float]:
    """The instance-level R@1 of every direction, by its key (``"<query>-><gallery>/R@1"``)."""
    return {k: v for k, v in metrics.items()
            if (p := MetricKey.parse(k)) is not None and not p.level and not p.chance and p.name == "R@1"}


def mean_recall_at_1(metrics: dict[str, float]) -> float:
    """Mean instance-level R@1 over every direction."""
    values = list(direction_r1(metrics).values())
    return float(np.mean(values)) if values else float("nan")


def headline(metrics: dict[str, float]) -> str:
    """One line for logs and the console: R@1 per direction and their mean."""
    shown = {**direction_r1(metrics), **({MEAN_R1: metrics[MEAN_R1]} if MEAN_R1 in metrics else {})}
    return ", ".join(f"{k} {v:.3f}" for k, v in shown.items())


# ---------------------------------------------------------------------------------------
# paired retrieval
# ---------------------------------------------------------------------------------------


def paired_retrieval(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, chunk_size: int = 1024,
                     labels: Sequence[str | None] | None = None, duplicates: Duplicates | None = None,
                     normalized: bool = False, instance_level: bool = True) -> dict[str, float]:
    """Retrieval metrics in both directions for aligned rows of ``a`` and ``b``.

    Keys look like ``"audio->image/R@1"``, ``"audio->image/mAP"`` and
    ``"audio->image/chance/R@1"``. Identical items count once: each direction
    ranks the distinct items of its gallery for each distinct query item, and
    a query's relevant items are the gallery items of its duplicate group
    (``duplicates``: :func:`find_duplicates` of the pairs' item keys; default:
    identical rows of ``a`` and ``b``); the chance levels come from the same
    gallery. With ``labels`` (one per row; ``None`` rows are left out) the
    class-level metrics follow as ``"audio->image/class/R@1"`` etc.: a hit is
    any item of the query's class. ``normalized``: the rows are unit float32 vectors
    already (no normalised copies are made); ``instance_level=False`` computes the
    class level alone.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired retrieval needs aligned rows, got {a.shape[0]} and {b.shape[0]}")
    out: dict[str, float] = {}
    duplicates = find_duplicates(a, b) if duplicates is None else duplicates
    if len(duplicates) != a.shape[0]:
        raise ValueError(f"{len(duplicates)} duplicate entries for {a.shape[0]} pairs")
    a, b = _unit(a, normalized), _unit(b, normalized)
    directions = ((name_a, name_b, a, b, 0), (name_b, name_a, b, a, 1))
    if instance_level:
        for qn, gn, q, g, side in directions:
            qs, gs = distinct_rows(duplicates.items(side)), distinct_rows(duplicates.items(1 - side))
            ranking = rank_gallery(_rows(q, qs), _rows(g, gs), duplicates.group[qs], duplicates.group[gs],
                                   chunk_size, True)
            for measure, value in ranking_metrics(ranking).items():
                out[_key(qn, gn, measure)] = value
    if labels is not None:
        keep = torch.tensor([i for i, x in enumerate(labels) if x is not None], dtype=torch.long)
        if len(keep) >= 2:
            ids, _ = encode_labels([str(labels[i]) for i in keep.tolist()])
            labelled = duplicates[keep]
            for qn, gn, q, g, side in directions:
                qs, gs = distinct_rows(labelled.items(side)), distinct_rows(labelled.items(1 - side))
                ranking = rank_gallery(_rows(q, keep[qs]), _rows(g, keep[gs]), ids[qs], ids[gs], chunk_size, True)
                for measure, value in ranking_metrics(ranking).items():
                    out[_key(qn, gn, measure, CLASS_LEVEL)] = value
    return out


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]``, or ``x`` itself (no copy) when ``rows`` is every row in order."""
    if rows.numel() == x.shape[0] and (rows.numel() == 0 or int(rows[-1]) == x.shape[0] - 1):
        return x
    return x[rows.to(x.device)]


def _key(query: str, gallery: str, measure: str, level: str = "") -> str:
    """The key of ``measure`` (``"R@1"`` or ``"chance/R@1"``, as :func:`ranking_metrics` names it)."""
    chance, _, name = measure.rpartition("/")
    return str(MetricKey(query, gallery, name, level, chance == CHANCE))
