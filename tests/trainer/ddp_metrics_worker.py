"""Run under torchrun (2 processes) or in-process (1): evaluate() with compute_metrics and predict() on
7 samples of two sequence lengths, so the ranks' shares differ (4 and 3) and batches need -100 padding;
then the same evaluate() with eval_accumulation_steps=1, and one with batch_eval_metrics (batches of one).
Rank 0 writes ``<out>/metrics.json``, ``<out>/metrics_accumulated.json``, ``<out>/metrics_batch.json`` and
``<out>/predictions.npz``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import torch
from torch import nn

from optsched import Trainer, TrainingArguments
from trainer_helpers import leave_torchrun_worker  # the script's folder, first on sys.path


class TokenRegressor(nn.Module):
    main_input_name = "x"  # what include_for_metrics=["inputs"] collects

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
    preds, labels, inputs, losses = eval_pred
    weights = np.arange(1, len(labels) + 1)[:, None]
    return {"weighted": float((weights * np.where(labels == -100, 0, preds)).sum()), "n": len(labels),
            "inputs_weighted": float((weights[:, :, None] * np.where(inputs == -100, 0, inputs)).sum()),
            "losses": len(losses)}


def batch_order_sensitive():
    """order_sensitive over the batches it is called with (torch tensors), with the batches' flags."""
    totals = {"n": 0, "weighted": 0.0, "inputs_weighted": 0.0, "losses": 0, "flags": []}

    def compute_metrics(eval_pred, compute_result):
        preds, labels, x = eval_pred.predictions, eval_pred.label_ids, eval_pred.inputs["x"]
        weights = torch.arange(totals["n"] + 1, totals["n"] + len(labels) + 1, dtype=torch.float64)[:, None]
        totals["weighted"] += float((weights * torch.where(labels == -100, 0, preds)).sum())
        totals["inputs_weighted"] += float((weights[:, :, None] * torch.where(x == -100, 0, x)).sum())
        totals["n"] += len(labels)
        totals["losses"] += len(eval_pred.losses)
        totals["flags"].append(compute_result)
        return dict(totals) if compute_result else None

    return compute_metrics


def written(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}


def run(out: str) -> None:
    args = TrainingArguments(output_dir=out, use_cpu=True, per_device_eval_batch_size=2, disable_tqdm=True,
                             report_to="none", include_for_metrics=["inputs", "loss"])
    trainer = Trainer(TokenRegressor(), args, eval_dataset=data(), compute_metrics=order_sensitive)
    metrics = trainer.evaluate()
    pred = trainer.predict(data())
    trainer.args = dataclasses.replace(args, eval_accumulation_steps=1)
    accumulated = trainer.evaluate()
    # batches of one: rank 0 makes 4 steps, rank 1 3 and then takes part in the 4th without a batch
    batch_args = dataclasses.replace(args, batch_eval_metrics=True, per_device_eval_batch_size=1)
    batch = Trainer(TokenRegressor(), batch_args, eval_dataset=data(), compute_metrics=batch_order_sensitive()).evaluate()
    if trainer.is_world_process_zero():
        for name, values in (("metrics", metrics), ("metrics_accumulated", accumulated), ("metrics_batch", batch)):
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(written(values), f)
        np.savez(os.path.join(out, "predictions.npz"), predictions=pred.predictions, label_ids=pred.label_ids)


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    run(sys.argv[1])
    leave_torchrun_worker()  # after every rank wrote its files
