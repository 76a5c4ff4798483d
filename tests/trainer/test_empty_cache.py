"""torch_empty_cache_steps: the accelerator's cache emptied every N steps, as transformers does."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer import trainer as trainer_module
from optsched.trainer.distributed import empty_device_cache
from trainer_helpers import PlainRegressor


def test_the_cache_is_emptied_on_the_steps_transformers_empties_it(monkeypatch, tmp_path):
    # transformers: after the loss of each micro-batch whose step (global_step before it) is a multiple of N
    calls = []
    monkeypatch.setattr(trainer_module, "empty_device_cache", lambda device: calls.append(trainer.state.global_step))
    data = [{"x": torch.randn(3), "labels": torch.randn(())} for _ in range(12)]
    trainer = Trainer(PlainRegressor(), TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        torch_empty_cache_steps=2, save_strategy="no", disable_tqdm=True, use_cpu=True), train_dataset=data)
    trainer.train()
    assert calls == [0, 0, 2, 2, 4, 4]  # both micro-batches of steps 0, 2 and 4


def test_empty_device_cache_calls_the_devices_own_and_nothing_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    empty_device_cache(torch.device("cpu"))
    empty_device_cache(torch.device("cuda", 0))
    assert calls == ["cuda"]


def test_torch_empty_cache_steps_is_checked():
    with pytest.raises(ValueError, match="torch_empty_cache_steps"):
        TrainingArguments(torch_empty_cache_steps=0)
