"""Soak: 2,000 steps saving every 20 with save_total_limit=2: flat memory, at most 2 checkpoints on disk."""

from __future__ import annotations

import gc
import os
import tracemalloc

import torch
from _helpers import Tiny, make_args, make_data

from optsched.trainer import Trainer, TrainerCallback
from optsched.trainer import checkpoint as ckpt

STEPS, SAVE_EVERY, LIMIT = 2000, 20, 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Probe(TrainerCallback):
    """Python heap (tracemalloc) and RSS at the end of the first and last quarter; disk after each save."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.heap: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.max_on_disk = 0
        self.saves = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (STEPS // 4, STEPS):
            gc.collect()
            self.heap[state.global_step] = tracemalloc.get_traced_memory()[0]
            self.rss[state.global_step] = _rss_bytes()

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1
        names = os.listdir(self.out)
        self.max_on_disk = max(self.max_on_disk, sum(n.startswith("checkpoint-") for n in names))
        assert not [n for n in names if n.startswith(".tmp-")], names


def test_soak_memory_is_flat_and_rotation_holds(tmp_path):
    out = str(tmp_path / "out")
    probe = _Probe(out)
    args = make_args(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, save_total_limit=LIMIT,
                     logging_steps=100, per_device_train_batch_size=8)
    torch.set_num_threads(1)
    tracemalloc.start()
    try:
        t = Trainer(Tiny(), args, train_dataset=make_data(64), callbacks=[probe])
        t.train()
    finally:
        tracemalloc.stop()
        torch.set_num_threads(os.cpu_count() or 1)
    assert probe.saves == STEPS // SAVE_EVERY
    assert probe.max_on_disk <= LIMIT + 1  # the newest, while it is flushed to disk before the rotation
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1980", "checkpoint-2000"]
    heap_growth = probe.heap[STEPS] - probe.heap[STEPS // 4]
    rss_growth = probe.rss[STEPS] - probe.rss[STEPS // 4]
    # measured: ~19 kB of heap (15 more log_history entries) and ~0.1 MiB RSS; keeping one optimizer
    # state dict per save alive would add ~3 kB x 75 saves to the heap
    assert heap_growth < 64 * 1024, f"python heap grew by {heap_growth} bytes"
    assert rss_growth < 8 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
