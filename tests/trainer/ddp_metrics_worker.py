"""Run under torchrun (2 processes) or in-process (1): evaluate() with compute_metrics and predict() on
7 samples of two sequence lengths, so the ranks' shares differ (4 and 3) and batches need -100 padding.
Rank 0 writes ``<out>/metrics.json`` and ``<out>/predictions.npz``."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from torch import nn

from optsched import Trainer, TrainingArguments


class TokenRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        logits = self.linear(x).squeeze(-1)
        return {"loss": ((logits - labels) ** 2).mean(), "logits": logits}


def data() -> list[dict[str, torch.Tensor]]:
    # samples 0-3 of length 3, 4-6 of length 5: rank 0 reads [0, 2], [4, 6]; rank 1 [1, 3], [5]
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(3 if i < 4 else 5, 4, generator=g), "labels": torch.full((3 if i < 4 else 5,), float(i))}
            for i in range(7)]


def order_sensitive(eval_pred):
    preds, labels = eval_pred
    weights = np.arange(1, len(labels) + 1)[:, None]
    return {"weighted": float((weights * np.where(labels == -100, 0, preds)).sum()), "n": len(labels)}


def run(out: str) -> None:
    args = TrainingArguments(output_dir=out, use_cpu=True, per_device_eval_batch_size=2, disable_tqdm=True,
                             report_to="none")
    trainer = Trainer(TokenRegressor(), args, eval_dataset=data(), compute_metrics=order_sensitive)
    metrics = trainer.evaluate()
    pred = trainer.predict(data())
    if trainer.is_world_process_zero():
        keep = {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(keep, f)
        np.savez(os.path.join(out, "predictions.npz"), predictions=pred.predictions, label_ids=pred.label_ids)


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    run(sys.argv[1])
    # ddp_worker.py's teardown, for the same reason: every rank waits for rank 0's files, then leaves
    # without finalizing (a gloo thread torn down during interpreter finalization aborts ~1 exit in 16)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
