"""Run by test_trainer_ddp.py under ``torchrun --nproc_per_node=2`` (gloo on CPU); not a test module.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_grouping_worker.py OUTPUT_DIR
Each rank trains transformers' Trainer, then optsched's, with group_by_length on the same data, and writes
OUTPUT_DIR/batches_<rank>.json: the samples of each batch it saw under each Trainer, and the final weights.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_helpers import (  # noqa: E402
    leave_torchrun_worker,
    make_trainer,
    pad_collate,
    record_batches,
    tiny_llama,
    varied_length_data,
)

#: 23 samples, 2 processes x batch 2: 6 batches a rank an epoch (the last round completed from the first
#: batches); GA 2: megabatches of 4
FIELDS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=1e-2,
              save_strategy="no", disable_tqdm=True, use_cpu=True, seed=7, train_sampling_strategy="group_by_length")


def run(kind: str, output_dir: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_llama()
    seen = record_batches(model)
    make_trainer(kind, model, varied_length_data(), pad_collate, output_dir=output_dir, **FIELDS).train()
    return {"batches": seen, "weights": {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}}


if __name__ == "__main__":
    out = sys.argv[1]
    results = {kind: run(kind, os.path.join(out, kind)) for kind in ("hf", "optsched")}
    with open(os.path.join(out, f"batches_{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    leave_torchrun_worker()  # after every rank wrote its files
