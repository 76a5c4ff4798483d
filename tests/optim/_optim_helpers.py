"""Helpers shared by the optimizer tests: a small quadratic problem and package hiding."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn


class Quadratic(nn.Module):
    """loss = mean((W2 relu-free (W1 x + b1) + b2 - y)^2): two linear layers (GaLore/APOLLO targets),
    an embedding-free, norm-free least-squares problem whose loss every optimizer should lower."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("x", torch.randn(32, 8, generator=gen))
        self.register_buffer("y", torch.randn(32, 4, generator=gen))

    def loss(self) -> torch.Tensor:
        return ((self.out(self.inp(self.x)) - self.y) ** 2).mean()


def make_quadratic(seed: int = 0) -> Quadratic:
    torch.manual_seed(seed)
    return Quadratic()


def hide_package(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    """Make ``import root`` (and any ``root.*``) fail as if the package were not installed."""
    for name in list(sys.modules):
        if name == root or name.startswith(root + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, root, None)
