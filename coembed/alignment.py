"""Closed-form and training-free alignment: the baselines of ``train.method``.

Each method fits heads from the training pairs without gradient descent and
keeps, among a few candidate settings, the one with the best
``train.select_metric`` on the validation sample, exactly as the trainer's model
selection does (:class:`Aligner` has the :class:`~coembed.training.Trainer`'s
interface: ``fit``, ``final_metrics``, ``release_training_tensors``). The heads
are ordinary modules (:mod:`coembed.heads`), so the saved model embeds and is
evaluated like a trained one.

Every pair type joins the anchor with another modality; ``X`` is that other
side's encoder vectors, ``Y`` the anchor's, ``mx`` and ``my`` their means.

* ``ridge``: ``x -> (x - mx) W + my``, ``W = (Xc'Xc + alpha I)^-1 Xc'Yc`` (``alpha`` relative to the mean
  eigenvalue of ``Xc'Xc``, chosen on validation); the anchor keeps the identity.
* ``procrustes``: ``x -> s (x - mx) R + my`` with ``R = U V'`` from the thin SVD ``Xc'Yc = U S V'`` and the
  least-squares scale ``s = sum(S) / |Xc|^2``. With equal dims ``R`` is orthogonal; when they differ it
  is the nearest partial isometry: ``x`` is projected onto the ``min(dx, dy)`` directions of its space
  that ``Y`` is most correlated with, then rotated onto their partners in the anchor's space (no separate
  PCA step). The anchor keeps the identity.
* ``cca``: both sides are mapped, ``x -> (x - mx) A diag(rho)`` and ``y -> (y - my) B diag(rho)``, onto the
  first ``k`` canonical directions (regularised covariances), each weighted by its canonical correlation
  ``rho``; ``k`` is chosen on validation. The anchor gets a linear head too, and the model's output
  dimension is ``k``.
* ``asif``: training-free relative representations. ``train.alignment.asif_anchors`` training pairs are
  the anchor pairs; an item of either side is described by its similarities to that side's anchor items,
  the ``top_k`` largest kept and raised to ``power`` (:class:`~coembed.heads.AsifHead`; ``top_k`` and
  ``power`` chosen on validation). The output dimension is the number of anchor pairs, which are stored in
  the heads' weights.

``cca`` and ``asif`` map the anchor too, so they take one pair type, and every modality of the recipe must
be in it (see :class:`~coembed.config.Recipe`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import torch
from torch import nn
from tqdm.auto import tqdm

from coembed.config import HeadConfig, TrainConfig
from coembed.heads import AsifHead, IdentityHead, LinearHead
from coembed.training import (PairSet, TrainResult, better, check_select_metric, evaluate, final_retrieval,
                              selection_sizes)

log = logging.getLogger(__name__)

#: Canonical dimensions below this are not tried by default.
MIN_CCA_DIM = 8


@dataclass
class Candidate:
    """One setting of a method: its parameters (a history row's keys) and the heads it fits."""

    params: dict[str, float]
    heads: dict[str, nn.Module]


def linear_head(weight: torch.Tensor, bias: torch.Tensor) -> LinearHead:
    """``x -> x @ weight + bias`` (``weight`` is ``[in, out]``) as a :class:`LinearHead`, in float32."""
    head = LinearHead(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        head.weight.copy_(weight.T.float())
        head.bias.copy_(bias.float())
    return head


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(dim=0)
    return x - mean, mean


def ridge_maps(x: torch.Tensor, y: torch.Tensor, alphas: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(W, b)`` of ``x -> x W + b`` minimising ``|x W + b - y|^2 + alpha' |W|^2`` for each ``alpha``, with
    ``alpha' = alpha * mean eigenvalue of Xc'Xc``: one eigendecomposition serves every penalty."""
    xc, mx = _centred(x)
    yc, my = _centred(y)
    eigenvalues, q = torch.linalg.eigh(xc.T @ xc)
    projected = q.T @ (xc.T @ yc)
    scale = float(eigenvalues.clamp(min=0).mean()) or 1.0
    maps = []
    for alpha in alphas:
        w = q @ (projected / (eigenvalues.clamp(min=0) + alpha * scale)[:, None])
        maps.append((w, my - mx @ w))
    return maps


def procrustes_map(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s R, b)`` of ``x -> s (x - mx) R + my``: ``R`` (``[dx, dy]``) has orthonormal rows or columns
    (orthogonal when the dims are equal) and, with the scale ``s``, minimises ``|s Xc R - Yc|^2``."""
    xc, mx = _centred(x)
    yc, my = _centred(y)
    u, s, vh = torch.linalg.svd(xc.T @ yc, full_matrices=False)
    rotation = u @ vh
    scale = float(s.sum() / (xc * xc).sum().clamp(min=1e-12))
    w = scale * rotation
    return w, my - mx @ w


def _inverse_sqrt(c: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(c)
    return vectors @ torch.diag(values.clamp(min=1e-12).rsqrt()) @ vectors.T


def cca_maps(x: torch.Tensor, y: torch.Tensor, regularization: float = 1e-3
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical correlation analysis: ``(A, B, rho, mx, my)``, the canonical directions of ``x`` (``[dx, r]``)
    and ``y`` (``[dy, r]``), ``r = min(dx, dy)``, by decreasing correlation ``rho``. Each covariance gets
    ``regularization`` times its mean eigenvalue added to its diagonal."""
    xc, mx = _centred(x)
    yc, my = _centred(y)
    n = max(x.shape[0] - 1, 1)
    cxx, cyy, cxy = xc.T @ xc / n, yc.T @ yc / n, xc.T @ yc / n
    cxx = cxx + regularization * float(cxx.diagonal().mean()) * torch.eye(cxx.shape[0], dtype=cxx.dtype)
    cyy = cyy + regularization * float(cyy.diagonal().mean()) * torch.eye(cyy.shape[0], dtype=cyy.dtype)
    wx, wy = _inverse_sqrt(cxx), _inverse_sqrt(cyy)
    u, rho, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    return wx @ u, wy @ vh.T, rho, mx, my


def default_cca_dims(limit: int) -> list[int]:
    """Powers of two from :data:`MIN_CCA_DIM` below ``limit``, and ``limit`` itself."""
    dims, k = [], MIN_CCA_DIM
    while k < limit:
        dims.append(k)
        k *= 2
    return dims + [limit]


def anchor_pair_positions(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` training pairs (all when fewer) drawn by ``seed``, in their order: ASIF's anchor pairs."""
    if n <= size:
        return torch.arange(n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return chosen.sort().values


def _sides(pair: PairSet, anchor: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The other modality of a pair type and its training vectors with the anchor's: ``(m, X, Y)``."""
    if pair.a == anchor:
        return pair.b, pair.train_b, pair.train_a
    return pair.a, pair.train_a, pair.train_b


class Aligner:
    """Fits the heads of ``train.method`` (not ``contrastive``) on ``pairs``; every pair type holds the anchor.

    ``heads`` (every modality of the model) is updated in place: the fitted modalities' heads are replaced.
    After :meth:`fit`, :attr:`head_configs` describe the replaced heads and :attr:`output_dim` is the
    model's output dimension.
    """

    def __init__(self, heads: nn.ModuleDict, pairs: list[PairSet], config: TrainConfig, anchor: str,
                 seed: int = 0) -> None:
        if config.method == "contrastive":
            raise ValueError("train.method contrastive is the Trainer's")
        for p in pairs:
            if anchor not in (p.a, p.b):
                raise ValueError(f"train.method {config.method}: pair type {p.name} does not hold the anchor "
                                 f"{anchor!r}")
        if config.method in ("cca", "asif") and len(pairs) != 1:
            raise ValueError(f"train.method {config.method} maps the anchor too: it takes one pair type, "
                             f"got {len(pairs)}")
        self.config = config
        self.heads = heads
        self.pairs = [p.to(torch.device("cpu")) for p in pairs]
        self.anchor = anchor
        self.seed = seed
        self.selection = [p.validation_sample(config.validation_sample, seed) for p in self.pairs]
        self._sizes = selection_sizes(self.pairs, self.selection)
        anchor_dim = next(p.train_a if p.a == anchor else p.train_b for p in self.pairs).shape[1]
        self.output_dim = anchor_dim
        self.head_configs: dict[str, HeadConfig] = {}

    # -- the candidates of each method ------------------------------------------------
    def _candidates(self) -> list[Candidate]:
        cfg = self.config.alignment
        method = self.config.method
        sides = [_sides(p, self.anchor) for p in self.pairs]
        if method == "ridge":
            maps = {m: ridge_maps(x, y, cfg.ridge_alphas) for m, x, y in sides}
            return [Candidate({"alpha": alpha}, {m: linear_head(*maps[m][i]) for m in maps})
                    for i, alpha in enumerate(cfg.ridge_alphas)]
        if method == "procrustes":
            return [Candidate({}, {m: linear_head(*procrustes_map(x, y)) for m, x, y in sides})]
        ((m, x, y),) = sides
        if method == "cca":
            a, b, rho, mx, my = cca_maps(x, y, cfg.cca_regularization)
            limit = min(a.shape[1], max(x.shape[0] - 1, 1))
            dims = sorted({min(k, limit) for k in cfg.cca_dims}) if cfg.cca_dims else default_cca_dims(limit)
            out = []
            for k in dims:
                wa, wb = a[:, :k] * rho[:k], b[:, :k] * rho[:k]
                out.append(Candidate({"dim": k}, {m: linear_head(wa, -mx @ wa), self.anchor: linear_head(wb, -my @ wb)}))
            return out
        if method == "asif":
            chosen = anchor_pair_positions(x.shape[0], cfg.asif_anchors, self.seed)
            return [Candidate({"top_k": k, "power": pw}, {m: AsifHead.over(x[chosen], k, pw),
                                                         self.anchor: AsifHead.over(y[chosen], k, pw)})
                    for k, pw in product(cfg.asif_top_k, cfg.asif_power)]
        raise ValueError(f"unknown train.method {method!r}")

    @staticmethod
    def _config_of(head: nn.Module) -> HeadConfig:
        if isinstance(head, AsifHead):
            return HeadConfig(type="asif", top_k=head.top_k, power=head.power)
        if isinstance(head, IdentityHead):
            return HeadConfig(type="identity")
        return HeadConfig(type="linear")

    def fit(self, on_epoch: Callable[[dict[str, float]], None] | None = None, progress: bool = True) -> TrainResult:
        """Fit every candidate, rank the validation sample with each, keep the best; one history row each."""
        metric = self.config.select_metric
        check_select_metric(metric, self.pairs)
        start = time.perf_counter()
        candidates = self._candidates()
        history: list[dict[str, float]] = []
        best: tuple[float | None, int, dict[str, float], Candidate | None] = (None, 0, {}, None)
        for i, candidate in enumerate(tqdm(candidates, desc=self.config.method, disable=not progress), start=1):
            t0 = time.perf_counter()
            trial = nn.ModuleDict({**self.heads, **candidate.heads})
            metrics = evaluate(trial, self.selection)
            row = {"epoch": i, **candidate.params, "seconds": time.perf_counter() - t0, **metrics}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            value = row.get(metric, float("nan"))
            if better(metric, value, best[0]):
                best = (value, i, metrics, candidate)
        _, best_index, best_metrics, chosen = best
        assert chosen is not None  # at least one candidate per method
        log.info("train.method %s: kept %s", self.config.method,
                 ", ".join(f"{k}={v}" for k, v in chosen.params.items()) or "the fitted map")
        for m, head in chosen.heads.items():
            self.heads[m] = head
            self.head_configs[m] = self._config_of(head)
        if self.anchor not in chosen.heads:
            self.heads[self.anchor] = IdentityHead()
            self.head_configs[self.anchor] = HeadConfig(type="identity")
        anchor_head = self.heads[self.anchor]
        if isinstance(anchor_head, AsifHead):
            self.output_dim = int(anchor_head.anchors.shape[0])
        elif isinstance(anchor_head, LinearHead):
            self.output_dim = anchor_head.out_features
        state = {f"heads.{k}": v.detach().cpu().clone() for k, v in self.heads.state_dict().items()}
        return TrainResult(history, best_index, best_metrics, None, time.perf_counter() - start, state,
                           self._sizes)

    def final_metrics(self, best_metrics: dict[str, float], chunk_size: int = 1024) -> dict[str, float]:
        """Retrieval of the kept heads on every validation pair, instance and class level (as the trainer's)."""
        self.selection = []
        return final_retrieval(self.heads, self.pairs, self._sizes, best_metrics, chunk_size)

    def release_training_tensors(self) -> None:
        for p in self.pairs:
            p.release_training_tensors()
