"""Projection heads: small modules that map an encoder's space into the anchor space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coembed.config import HeadConfig


class IdentityHead(nn.Identity):
    """The anchor's own space: vectors pass through unchanged."""


class LinearHead(nn.Linear):
    """One linear layer (the paper's transform layer)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, identity_init: bool = False) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        if identity_init:
            if in_dim != out_dim:
                raise ValueError(f"identity_init needs equal dims, got {in_dim} -> {out_dim}")
            with torch.no_grad():
                self.weight.copy_(torch.eye(in_dim))
                if self.bias is not None:
                    self.bias.zero_()


class ResidualBlock(nn.Module):
    """FuseMix's pre-LayerNorm residual block: ``x + Linear(Dropout(GELU(Linear(LN(x)))))``."""

    def __init__(self, dim: int, dropout: float = 0.0, bias: bool = True, norm: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim) if norm else nn.Identity(), nn.Linear(dim, dim, bias=bias),
                                 nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MLPHead(nn.Module):
    """An MLP: LayerNorm (``norm``), then either (Linear, GELU, Dropout) x (n-1), Linear; or with ``residual``
    Linear, (n-1) :class:`ResidualBlock`, LayerNorm (``norm``), Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0, bias: bool = True, norm: bool = True, residual: bool = False) -> None:
        super().__init__()
        hidden = hidden_dim or 2 * out_dim
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if norm else []
        if residual:
            layers.append(nn.Linear(in_dim, hidden, bias=bias))
            layers += [ResidualBlock(hidden, dropout, bias, norm) for _ in range(num_layers - 1)]
            layers += [nn.LayerNorm(hidden)] if norm else []
            layers.append(nn.Linear(hidden, out_dim, bias=bias))
        else:
            dim = in_dim
            for _ in range(num_layers - 1):
                layers += [nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Dropout(dropout)]
                dim = hidden
            layers.append(nn.Linear(dim, out_dim, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AsifHead(nn.Module):
    """A training-free relative representation (ASIF): an item is described by its similarities to
    ``n_anchors`` anchor items of its modality, only the ``top_k`` largest kept, raised to ``power``.

    Both modalities of a pair type get one, over the two sides of the same anchor pairs, so the output
    coordinates (one per anchor pair) mean the same on both sides. The anchor items are a buffer:
    they are saved with the head's weights.
    """

    #: rows of input compared with the anchors at once (the dense ``[rows, n_anchors]`` similarities)
    chunk_rows = 1024

    def __init__(self, in_dim: int, n_anchors: int, top_k: int = 32, power: float = 8.0) -> None:
        super().__init__()
        self.register_buffer("anchors", torch.zeros(n_anchors, in_dim))
        self.top_k = min(top_k, n_anchors)
        self.power = power

    @classmethod
    def over(cls, anchors: torch.Tensor, top_k: int, power: float) -> AsifHead:
        """The head comparing with ``anchors`` (``[n_anchors, in_dim]``, normalised here)."""
        head = cls(anchors.shape[1], anchors.shape[0], top_k, power)
        with torch.no_grad():
            head.anchors.copy_(F.normalize(anchors.float(), dim=-1))
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, x.shape[0], self.chunk_rows):
            sims = F.normalize(x[start:start + self.chunk_rows].float(), dim=-1) @ self.anchors.T
            values, index = sims.topk(self.top_k, dim=-1)
            parts.append(torch.zeros_like(sims).scatter_(-1, index, values.clamp(min=0.0).pow(self.power)))
        return torch.cat(parts) if parts else x.new_zeros((0, self.anchors.shape[0]))


def build_head(config: HeadConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The head ``config`` describes, from ``in_dim`` to ``out_dim``."""
    if config.type == "identity":
        if in_dim != out_dim:
            raise ValueError(f"an identity head needs the encoder's dim ({in_dim}) to equal the anchor's "
                             f"({out_dim}); use a linear or mlp head")
        return IdentityHead()
    if config.type == "linear":
        return LinearHead(in_dim, out_dim, bias=config.bias, identity_init=config.identity_init)
    if config.type == "mlp":
        return MLPHead(in_dim, out_dim, config.hidden_dim, config.num_layers, config.dropout, config.bias,
                       norm=config.norm == "layernorm", residual=config.residual)
    if config.type == "asif":
        return AsifHead(in_dim, out_dim, config.top_k, config.power)
    raise ValueError(f"unknown head type {config.type!r}")
