"""A tiny regression model and its data, built in code (shared by conftest.py and ddp_worker.py)."""

from __future__ import annotations

import torch
from torch import nn


class TinyRegressor(nn.Module):
    """Linear -> LayerNorm -> dropout -> Linear; returns ``{"loss", "logits"}`` like a HF model."""

    def __init__(self, dropout: float = 0.0, in_features: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x, labels=None):
        pred = self.out(self.drop(torch.relu(self.norm(self.inp(x))))).squeeze(-1)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = ((pred - labels) ** 2).mean()
        return out


def make_regression_data(n: int = 32, in_features: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x.sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]
