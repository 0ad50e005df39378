"""Evaluation: retrieval metrics between co-embedded modalities.

Similarities are computed in chunks of queries, so memory stays bounded by
``chunk_size x gallery`` whatever the number of queries.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def pair_ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Rank (1 = best) of ``gallery[i]`` among all gallery items for ``queries[i]``.

    Cosine similarity. A gallery item that ties with the true match counts
    against it (the pessimistic rank), so a constant model never looks good.
    """
    if queries.shape[0] != gallery.shape[0]:
        raise ValueError(f"paired retrieval needs as many queries as gallery items, "
                         f"got {queries.shape[0]} and {gallery.shape[0]}")
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    ranks = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    for sl in _chunks(q.shape[0], chunk_size):
        sims = q[sl] @ g.T
        positive = sims[torch.arange(sims.shape[0], device=sims.device), torch.arange(sl.start, sl.stop, device=sims.device)]
        greater_or_tied = (sims >= positive[:, None]).sum(dim=1)  # includes the positive itself
        ranks[sl] = greater_or_tied
    return ranks


def recall_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k, median rank and mean reciprocal rank from 1-based ranks."""
    r = ranks.float()
    out = {f"R@{k}": float((r <= k).float().mean()) for k in ks}
    out["median_rank"] = float(r.median()) if r.numel() else float("nan")
    out["mrr"] = float((1.0 / r).mean()) if r.numel() else float("nan")
    return out


def paired_retrieval(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str,
                     chunk_size: int = 1024) -> dict[str, float]:
    """Retrieval metrics in both directions for aligned rows of ``a`` and ``b``.

    Keys look like ``"audio->image/R@1"``; ``chance/R@1`` etc. give the level
    of a random ranking for the same gallery size.
    """
    out: dict[str, float] = {}
    for qn, gn, q, g in ((name_a, name_b, a, b), (name_b, name_a, b, a)):
        for key, value in recall_metrics(pair_ranks(q, g, chunk_size)).items():
            out[f"{qn}->{gn}/{key}"] = value
    n = a.shape[0]
    for k in RECALL_KS:
        out[f"{name_a}-{name_b}/chance/R@{k}"] = min(k, n) / n if n else float("nan")
    return out


def mean_recall_at_1(metrics: dict[str, float]) -> float:
    values = [v for k, v in metrics.items() if k.endswith("/R@1") and "/chance/" not in k]
    return float(np.mean(values)) if values else float("nan")
