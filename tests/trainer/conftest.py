"""Shared pieces for the Trainer tests: a tiny regression model and its data, built in code."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_helpers import TinyRegressor, make_regression_data  # noqa: E402


@pytest.fixture
def model_factory():
    def make(dropout: float = 0.0, seed: int = 0) -> TinyRegressor:
        torch.manual_seed(seed)
        return TinyRegressor(dropout=dropout)

    return make


@pytest.fixture
def regression_data():
    return make_regression_data


@pytest.fixture
def make_args(tmp_path):
    from optsched import TrainingArguments

    def make(**kwargs):
        defaults = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            report_to="none",
        )
        defaults.update(kwargs)
        return TrainingArguments(**defaults)

    return make
