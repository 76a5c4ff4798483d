"""Run by test_metrics.py under ``torchrun --nproc_per_node=2`` (gloo on CPU); not a test module.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_eval_batches_worker.py OUTPUT_DIR
Each rank runs transformers' Trainer's, then optsched's, predict() with eval_do_concat_batches=False (and
include_for_metrics inputs and loss) on 7 samples of 2 to 6 positions in batches of 2; rank 0 writes
OUTPUT_DIR/eval_batches.pkl: each Trainer's per-batch predictions, label_ids, inputs and losses.
"""

from __future__ import annotations

import os
import pickle
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_metrics_worker import TokenRegressor  # noqa: E402
from trainer_helpers import leave_torchrun_worker, make_trainer  # noqa: E402

#: per sample: its number of positions (sample 0 no longer than 4-6, which transformers' last step
#: completes with it)
LENGTHS = (2, 3, 4, 5, 3, 2, 6)


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(n, 4, generator=g), "labels": torch.full((n,), float(i))} for i, n in enumerate(LENGTHS)]


def pad_positions(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """x padded with 0 and labels with -100 to the batch's longest sample."""
    width = max(len(item["labels"]) for item in items)
    x = torch.zeros(len(items), width, 4)
    labels = torch.full((len(items), width), -100.0)
    for row, item in enumerate(items):
        x[row, : len(item["labels"])] = item["x"]
        labels[row, : len(item["labels"])] = item["labels"]
    return {"x": x, "labels": labels}


def run(kind: str, out: str) -> dict:
    captured = {}

    def compute_metrics(eval_pred):
        captured.update(inputs=eval_pred.inputs, losses=eval_pred.losses)
        return {}

    trainer = make_trainer(kind, TokenRegressor(), None, pad_positions, output_dir=os.path.join(out, kind),
                           per_device_eval_batch_size=2, eval_do_concat_batches=False, use_cpu=True, disable_tqdm=True,
                           include_for_metrics=["inputs", "loss"])
    trainer.compute_metrics = compute_metrics
    output = trainer.predict(data())
    return {"predictions": output.predictions, "label_ids": output.label_ids, **captured}


def object_labels(items: list[dict[str, torch.Tensor]]) -> dict:
    """:func:`pad_positions`, with labels as a detection collator gives them: a list of one dict per sample."""
    batch = pad_positions(items)
    batch["labels"] = [{"class_labels": torch.arange(len(item["labels"])), "boxes": item["x"][:, :2].clone()}
                       for item in items]
    return batch


class ObjectLabelsRegressor(TokenRegressor):
    def forward(self, x, labels=None):
        logits = self.linear(x).squeeze(-1)
        return {"loss": logits.pow(2).mean(), "logits": logits}


def run_object_labels(kind: str, out: str, gather_object: bool = True) -> list:
    """The label_ids of predict() with eval_use_gather_object (transformers needs it for such labels)."""
    trainer = make_trainer(kind, ObjectLabelsRegressor(), None, object_labels, output_dir=os.path.join(out, kind),
                           per_device_eval_batch_size=2, eval_do_concat_batches=False, use_cpu=True, disable_tqdm=True,
                           eval_use_gather_object=gather_object)
    return trainer.predict(data()).label_ids


if __name__ == "__main__":
    out = sys.argv[1]
    results = {kind: run(kind, out) for kind in ("hf", "optsched")}
    results["objects"] = {kind: run_object_labels(kind, out) for kind in ("hf", "optsched")}
    results["objects"]["optsched, no switch"] = run_object_labels("optsched", out, gather_object=False)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out, "eval_batches.pkl"), "wb") as f:
            pickle.dump(results, f)
    leave_torchrun_worker()  # after every rank wrote its files
