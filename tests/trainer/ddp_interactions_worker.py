"""Run by test_feature_interactions.py under ``torchrun --nproc_per_node=2`` (gloo on CPU); not a test module.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_interactions_worker.py OUTPUT_DIR
Each rank trains tiny Llama with several of the Trainer's features at once (:func:`run`, batch 2 a process)
and writes OUTPUT_DIR/result_<rank>.json (:func:`result`); the test runs :func:`run` in one process with
batch 4 and compares.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_helpers import leave_torchrun_worker, masked_lm_data, tiny_llama  # noqa: E402

from optsched import Trainer, TrainingArguments  # noqa: E402


class LabelAccuracy:
    """``batch_eval_metrics``' compute_metrics: the argmax's hits at the labelled positions (a causal LM's
    next token), the labels, and the summed per-sample losses and input elements of ``include_for_metrics``,
    accumulated over the batches and returned with ``compute_result``."""

    def __init__(self) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64)

    def __call__(self, eval_pred, compute_result=False):
        logits, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
        mask = labels != -100
        self.totals += torch.tensor([float((logits.argmax(-1) == labels)[mask].sum()), float(mask.sum()),
                                     float(eval_pred.losses.sum()), float(eval_pred.inputs["input_ids"].numel())],
                                    dtype=torch.float64)
        if not compute_result:
            return {}
        hits, count, losses, inputs = self.totals.tolist()
        self.totals.zero_()
        return {"accuracy": hits / count, "labels": count, "loss_sum": losses, "input_elements": inputs}


def run(output_dir: str, batch_size: int) -> Trainer:
    """12 samples (batch x processes = 4: 3 batches an epoch, GA 2 so the last step of each epoch is one
    batch), 6 steps, evaluated from step 0 and every 2 steps on 5 other samples one at a time (3 and 2 a
    process: the last step has one process without a batch), saved every 2, the best checkpoint (4) loaded."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=6, per_device_train_batch_size=batch_size, gradient_accumulation_steps=2,
        per_device_eval_batch_size=1, learning_rate=0.2, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True, seed=0, load_best_model_at_end=True,
        eval_on_start=True, include_num_input_tokens_seen="all", label_smoothing_factor=0.1, batch_eval_metrics=True,
        include_for_metrics=["inputs", "loss"])
    # 5 samples the training never sees: their loss is lowest at step 4
    trainer = Trainer(tiny_llama(), args, train_dataset=masked_lm_data(12), eval_dataset=masked_lm_data(17)[12:],
                      compute_metrics=LabelAccuracy())
    trainer.train()
    return trainer


def result(trainer: Trainer) -> dict:
    """The logs (no times), the best checkpoint, the tokens seen and the final weights."""
    logs = [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
            for entry in trainer.state.log_history]
    return {"logs": logs, "best": os.path.basename(trainer.state.best_model_checkpoint or ""),
            "tokens": trainer.state.num_input_tokens_seen,
            "weights": {n: p.detach().flatten().tolist() for n, p in trainer.model.named_parameters()}}


if __name__ == "__main__":
    out = sys.argv[1]
    outcome = result(run(out, batch_size=2))
    with open(os.path.join(out, f"result_{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(outcome, f)
    leave_torchrun_worker()  # after every rank wrote its file
