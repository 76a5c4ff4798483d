"""Helpers shared by the optimizer tests: a small quadratic problem, seeded parameters and gradients,
a step loop, and package hiding."""

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


def seeded_params(shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Standard-normal parameters of these shapes from a seeded generator, cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def scaled_grads(shapes, steps: int, seed: int = 1, decades: int = 7) -> list[list[torch.Tensor]]:
    """Gradients for ``steps`` steps whose scale cycles over ``decades`` powers of ten around 1
    (``10 ** ((t % decades) - decades // 2)``), so that clipping and eps both matter."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 10.0 ** ((t % decades) - decades // 2) for s in shapes]
            for t in range(steps)]


def run_steps(opt: torch.optim.Optimizer, params, grads) -> None:
    """One ``opt.step()`` per entry of ``grads``, each gradient set on its parameter in its dtype."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


def hide_package(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    """Make ``import root`` (and any ``root.*``) fail as if the package were not installed."""
    for name in list(sys.modules):
        if name == root or name.startswith(root + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, root, None)
