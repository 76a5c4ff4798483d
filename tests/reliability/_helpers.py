"""A tiny model, its data and a training run, shared by the reliability tests and their subprocess worker."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """Linear -> tanh -> Linear regression; returns ``{"loss"}`` like a HF model. ``poison`` injects NaN."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)
        self.poison_steps: set[int] = set()
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        pred = self.b(torch.tanh(self.a(x))).squeeze(-1)
        loss = ((pred - labels) ** 2).mean()
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        return {"loss": loss}


def make_data(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(-1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def make_args(output_dir: str, **kwargs):
    from optsched import TrainingArguments

    base = dict(
        output_dir=output_dir, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", disable_tqdm=True, use_cpu=True, optim="adamw_torch", seed=0,
    )
    base.update(kwargs)
    return TrainingArguments(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
