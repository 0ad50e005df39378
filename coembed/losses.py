"""Contrastive losses over paired embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class LearnableTemperature(nn.Module):
    """``logit_scale = 1 / temperature`` stored as a log, clamped to ``[1/max, 1/min]``."""

    def __init__(self, init: float = 0.07, learnable: bool = True, min_temperature: float = 0.01) -> None:
        super().__init__()
        value = torch.tensor(math.log(1.0 / init))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_log_scale = math.log(1.0 / min_temperature)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self().detach())


#: Rows (or columns) of the ``[batch, batch]`` logits processed at once outside the one full buffer.
_CHUNK = 512


class SymmetricInfoNCE(torch.autograd.Function):
    """``0.5 * (CE(L, I) + CE(L.T, I))`` for ``L = scale * a @ b.T``, in one buffer of logits.

    The same value and gradients as the two ``F.cross_entropy`` calls over the
    logits and their transpose, which autograd would keep as about eight
    ``[batch, batch]`` tensors (0.5 GiB at batch 4096): here the logits are the
    only full-size tensor. The forward pass keeps them with the row and column
    log-sum-exps (computed in blocks of rows and columns); the backward pass turns
    them, block by block, into the gradient (the row softmax plus the column
    softmax, less 2 on the diagonal). The backward pass runs once
    (``retain_graph`` is not supported: it consumes the saved logits).

    One function serves one process and a batch spread over several: the caller holds rows
    ``offset .. offset + n`` of the global batch's ``a`` and the whole batch's ``b`` (``all_b``, ``N`` rows;
    one process: ``all_b`` is ``b``, ``offset`` 0). Its block of the logits is ``[n, N]``, ``1 / world_size``
    of the one-process buffer and as much of the work; the row log-sum-exps are the block's own, the column
    ones are combined across processes by ``logsumexp_across`` (every process's ``[N]`` partial values in,
    the global ones out; ``None`` with one process). The loss returned is the caller's share (its rows'
    terms and its columns' terms, each divided by ``N``), so the shares add up to the one-process loss and
    so do the gradients (``all_b``'s go back to the process owning the rows, see
    :meth:`coembed.distributed.World.gather_rows`). ``workspace``: a float32 buffer of at least ``n * N``
    values to hold the logits; ``excluded``: an ``[n, N]`` mask of pairs that are not negatives.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, all_b: torch.Tensor, scale: torch.Tensor, offset: int,
                logsumexp_across: Callable[[torch.Tensor], torch.Tensor] | None,
                workspace: torch.Tensor | None, excluded: torch.Tensor | None) -> torch.Tensor:
        n, total = a.shape[0], all_b.shape[0]
        if workspace is not None and workspace.numel() >= n * total and workspace.dtype == a.dtype:
            logits = torch.mm(a, all_b.T, out=workspace.view(-1)[:n * total].view(n, total)).mul_(scale)
        else:
            logits = torch.mm(a, all_b.T).mul_(scale)
        if excluded is not None:  # not negatives: out of both softmaxes, so their gradient is exp(-inf) = 0
            logits.masked_fill_(excluded, float("-inf"))
        row = torch.cat([torch.logsumexp(logits[i:i + _CHUNK], dim=1) for i in range(0, n, _CHUNK)]) \
            if n else logits.new_zeros(0)
        col = torch.cat([torch.logsumexp(logits[:, j:j + _CHUNK], dim=0) for j in range(0, total, _CHUNK)])
        if logsumexp_across is not None:
            col = logsumexp_across(col)
        diag = logits[:, offset:offset + n].diagonal()
        loss = 0.5 * ((row - diag).sum() + (col[offset:offset + n] - diag).sum()) / total
        ctx.offset = offset
        ctx.save_for_backward(a, all_b, scale, logits, row, col)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, all_b, scale, logits, row, col = ctx.saved_tensors
        n, total = logits.shape
        g = logits  # becomes d loss / d logits of this block, in place
        for i in range(0, n, _CHUNK):
            block = g[i:i + _CHUNK]
            column_softmax = (block - col[None, :]).exp_()
            block.sub_(row[i:i + _CHUNK, None]).exp_().add_(column_softmax)
        g[:, ctx.offset:ctx.offset + n].diagonal().sub_(2.0)
        g.mul_(grad * (0.5 / total))
        g_b = torch.mm(g, all_b)  # d loss / d (a @ all_b.T), times all_b
        grad_a = g_b * scale if ctx.needs_input_grad[0] else None
        grad_all_b = torch.mm(g.T, a) * scale if ctx.needs_input_grad[1] else None
        grad_scale = (g_b * a).sum().reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return grad_a, grad_all_b, grad_scale, None, None, None, None


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
             workspace: torch.Tensor | None = None, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row ``i`` of ``a`` is the positive of row ``i`` of ``b``.

    Inputs are L2-normalised here; the loss is computed in float32
    (:class:`SymmetricInfoNCE`). ``workspace``, a float32 buffer of at least
    ``batch**2`` values, holds the logits instead of a new allocation each
    step; one buffer serves one call at a time (until its backward pass).
    ``excluded``, a ``[batch, batch]`` boolean mask that is false on the
    diagonal, names pairs that are not negatives (same class): they leave
    both softmaxes.
    """
    if b.requires_grad and not a.requires_grad:
        # the loss is symmetric in a and b; with the trained side first its gradient needs no
        # transposed [batch, batch] product, which measured ~10% faster per CPU step
        a, b = b, a
        excluded = None if excluded is None else excluded.T
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return SymmetricInfoNCE.apply(a, b, logit_scale.float(), 0, None, workspace, excluded)


def sigmoid_pairwise(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's loss: ``-mean_i sum_j log sigmoid(z_ij (scale * a_i . b_j + bias))``, ``z`` = 1 on the
    diagonal and -1 elsewhere, over L2-normalised inputs in float32; ``excluded`` pairs (not negatives)
    are left out of the sum."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = logit_scale.float() * (a @ b.T) + bias.float()
    signs = 2.0 * torch.eye(a.shape[0], device=a.device) - 1.0
    terms = F.logsigmoid(signs * logits)
    if excluded is not None:
        terms = terms.masked_fill(excluded, 0.0)
    return -terms.sum() / a.shape[0]


class PairLoss(nn.Module):
    """The loss of one batch of pairs, ``train.loss``: ``"infonce"`` (:func:`info_nce`) or ``"sigmoid"``
    (:func:`sigmoid_pairwise`, whose learnable bias is this module's parameter)."""

    def __init__(self, kind: str = "infonce", bias_init: float = -10.0, learnable_bias: bool = True) -> None:
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"unknown loss {kind!r}")
        self.kind = kind
        if kind == "sigmoid":
            value = torch.tensor(float(bias_init))
            if learnable_bias:
                self.bias = nn.Parameter(value)
            else:
                self.register_buffer("bias", value)

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                workspace: torch.Tensor | None = None, excluded: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "sigmoid":
            return sigmoid_pairwise(a, b, logit_scale, self.bias, excluded)
        return info_nce(a, b, logit_scale, workspace, excluded)


def same_class(labels: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` mask of the pairs ``(i, j)``, ``i != j``, of one known class (label >= 0; -1: unknown)."""
    known = labels >= 0
    mask = (labels[:, None] == labels[None, :]) & known[:, None] & known[None, :]
    mask.fill_diagonal_(False)
    return mask


# ---------------------------------------------------------------------------------------
# one batch spread over several processes
# ---------------------------------------------------------------------------------------


def info_nce_gathered(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                      gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
                      logsumexp_across: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """This process's share of the symmetric InfoNCE of a batch spread over processes
    (:class:`SymmetricInfoNCE` over its block of rows; :func:`info_nce` of the whole batch is the sum of the shares).

    ``a`` and ``b`` are this process's rows; ``gather(x)`` returns every process's rows of ``x`` in one order,
    the same on each, with gradients, and where this process's rows start in it
    (:meth:`coembed.distributed.World.gather_rows`); ``logsumexp_across`` combines log-sum-exps over the
    processes (:meth:`coembed.distributed.World.logsumexp`). Inputs are L2-normalised here, the loss is float32.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    all_b, offset = gather(b)
    return SymmetricInfoNCE.apply(a, all_b, logit_scale.float(), offset, logsumexp_across, None, None)
