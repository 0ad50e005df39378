"""Projection heads: small modules that map an encoder's space into the anchor space."""

from __future__ import annotations

import torch
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


class MLPHead(nn.Module):
    """Pre-LayerNorm residual-free MLP: LayerNorm, (Linear, GELU, Dropout) x (n-1), Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden_dim or 2 * out_dim
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Dropout(dropout)]
            dim = hidden
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
        return MLPHead(in_dim, out_dim, config.hidden_dim, config.num_layers, config.dropout, config.bias)
    raise ValueError(f"unknown head type {config.type!r}")
