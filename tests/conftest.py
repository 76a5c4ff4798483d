"""Shared test set-up: CPU only, one torch thread per xdist worker, deterministic seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    # No per-example deadline: a loaded 2-core machine makes timings meaningless (performance is
    # measured in benchmarks/, never asserted in tests). Under CI the examples are derandomized so
    # a run is reproducible; locally each run explores new examples.
    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("dev", **common)
    settings.register_profile("ci", derandomize=True, **common)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


_hypothesis_profiles()


def pytest_configure(config):
    import torch

    # One intra-op thread per test process: the tests use tiny tensors, where a second thread only
    # adds synchronisation (10-30x slower on a loaded 2-core machine), and two xdist workers then
    # share the two cores instead of oversubscribing them.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    import torch

    torch.manual_seed(0)
    yield
    # A test that changes the thread count (the benchmarks' --threads, the demo) leaves the next
    # one the single thread it expects.
    torch.set_num_threads(1)


@pytest.fixture
def lr_evaluations(monkeypatch) -> list[int]:
    """``[n]``: the number of steps at which any ``ScheduleLR`` is evaluated (``lr_at``) during the test."""
    from optsched.schedules import ScheduleLR

    calls = [0]
    lr_at = ScheduleLR.lr_at

    def counted(self, step):
        calls[0] += 1
        return lr_at(self, step)

    monkeypatch.setattr(ScheduleLR, "lr_at", counted)
    return calls
