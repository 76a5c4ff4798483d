"""Shared test set-up: CPU only, one torch thread per xdist worker, deterministic seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    import torch

    # One intra-op thread per test process: the tests use tiny tensors, where a second thread only
    # adds synchronisation (10-30x slower on a loaded 2-core machine), and two xdist workers then
    # share the two cores instead of oversubscribing them.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
