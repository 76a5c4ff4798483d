"""full_determinism (optsched.trainer.determinism): transformers' enable_full_determinism, process-wide."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from optsched.trainer.determinism import FULL_DETERMINISM_ENVIRONMENT
from trainer_helpers import TinyRegressor, make_regression_data, make_trainer, masked_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")


def _process_settings() -> dict:
    """What full_determinism may change: torch's and cuDNN's flags, and the environment it writes."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        **{name: os.environ.get(name) for name in FULL_DETERMINISM_ENVIRONMENT},
    }


def _restore(settings: dict) -> None:
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"], warn_only=settings["warn_only"])
    torch.backends.cudnn.deterministic = settings["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn.benchmark"]
    for name in FULL_DETERMINISM_ENVIRONMENT:
        if settings[name] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = settings[name]


@pytest.fixture
def baseline():
    """The process's settings before the test, put back after it (and by the test between two Trainers)."""
    settings = _process_settings()
    yield settings
    _restore(settings)


def _fields(tmp_path, name, **extra):
    return dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=7, **extra)


def _rng_states() -> tuple:
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].tobytes()


@pytest.mark.parametrize("full_determinism", [True, False])
def test_the_process_is_set_as_transformers_trainer_sets_it(tmp_path, baseline, full_determinism):
    """From a process that benchmarks cuDNN and has its own cuBLAS workspace: both Trainers leave it as it is,
    or with full_determinism both set the same flags and environment (overwriting the workspace)."""
    start = {**baseline, "cudnn.benchmark": True, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    seen = {}
    for name in ("hf", "optsched"):
        _restore(start)
        torch.manual_seed(0)
        make_trainer(name, tiny_llama(), masked_lm_data(), **_fields(tmp_path, name, full_determinism=full_determinism))
        seen[name] = _process_settings(), _rng_states()
    assert seen["optsched"][0] == seen["hf"][0]
    ours, hf = seen["optsched"][1], seen["hf"][1]
    assert torch.equal(ours[0], hf[0]) and ours[1:] == hf[1:]  # seeded alike (seed=7)
    if full_determinism:
        assert seen["optsched"][0] == {**start, "deterministic_algorithms": True, "warn_only": False,
                                       "cudnn.deterministic": True, "cudnn.benchmark": False,
                                       "CUDA_LAUNCH_BLOCKING": "1", "CUBLAS_WORKSPACE_CONFIG": ":16:8",
                                       "ASCEND_LAUNCH_BLOCKING": "1", "HCCL_DETERMINISTIC": "1",
                                       "FLASH_ATTENTION_DETERMINISTIC": "1"}
    else:
        assert seen["optsched"][0] == start


def test_training_under_full_determinism_is_transformers_trainers_bitwise(tmp_path, baseline):
    """Tiny Llama, accumulation 2 over micro-batches holding different numbers of labels: the deterministic
    kernels train to transformers' Trainer's weights and losses, bit for bit."""
    runs = {}
    for name in ("optsched", "hf"):
        _restore(baseline)
        torch.manual_seed(0)
        model = tiny_llama()
        trainer = make_trainer(name, model, masked_lm_data(), **_fields(tmp_path, name, full_determinism=True,
                                                                       gradient_accumulation_steps=2))
        trainer.train()
        assert torch.are_deterministic_algorithms_enabled()
        runs[name] = model.state_dict(), [e["loss"] for e in trainer.state.log_history if "loss" in e]
    (ours, our_losses), (hf, hf_losses) = runs["optsched"], runs["hf"]
    assert all(torch.equal(ours[k], v) for k, v in hf.items())
    assert our_losses == hf_losses and len(our_losses) == 3


def test_training_under_full_determinism_is_reproducible(tmp_path, baseline):
    """Dropout draws from the generator full_determinism seeds: two runs give the same weights, bit for bit."""
    runs = []
    for run in range(2):
        torch.manual_seed(0)
        model = TinyRegressor(dropout=0.3)
        trainer = make_trainer("optsched", model, make_regression_data(),
                               **_fields(tmp_path, f"run{run}", full_determinism=True))
        trainer.train()
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], v) for k, v in runs[1].items())
