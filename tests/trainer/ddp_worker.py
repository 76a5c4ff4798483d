"""Run by test_trainer_ddp.py under ``torchrun --nproc_per_node=2`` (gloo on CPU); not a test module.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py OUTPUT_DIR [tokens|compile|best]
(``tokens``: a model normalising its loss by ``num_items_in_batch``, labels partly ignored; ``compile``:
the run twice, with gradient accumulation, without and with ``torch_compile`` (eager backend); ``best``:
evaluated and saved every 2 steps with ``load_best_model_at_end``, a metric best at step 2)
Rank 0 writes OUTPUT_DIR/ddp_result.json (loss per step and final weights; with ``compile``, the compiled
run's, and the uncompiled run's under "uncompiled"); with ``best`` every rank writes its own,
OUTPUT_DIR/ddp_result_{rank}.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_helpers import TinyRegressor, leave_torchrun_worker, make_regression_data  # noqa: E402

from optsched import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

DDP_STEPS = 6


class _CountsFlops:
    """transformers' two hooks of total_flos (main_input_name, num_parameters): 6 x x.numel() x 97 a batch."""

    main_input_name = "x"

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return 97


class RegressorWithAnUnusedLayer(_CountsFlops, TinyRegressor):
    """A trainable layer that no step uses (a head for another task, say): DDP stops at the second step
    unless it finds unused parameters (transformers' default for such a model; ``ddp_kwargs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(2, 2)


class TokenRegressor(_CountsFlops, TinyRegressor):
    """Takes loss kwargs: its loss is the squared error summed over the labels that are not -100, divided
    by the Trainer's ``num_items_in_batch`` (the step's count over every process), like a transformers
    model's ``fixed_cross_entropy``."""

    def forward(self, x, labels=None, **kwargs):
        out = {"logits": self.out(self.drop(torch.relu(self.norm(self.inp(x))))).squeeze(-1)}
        if labels is not None:
            kept = labels != -100
            total = ((out["logits"] - labels) ** 2 * kept).sum()
            num_items = kwargs.get("num_items_in_batch")
            out["loss"] = total / (kept.sum() if num_items is None else num_items)
        return out


def masked_regression_data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Every third label ignored (-100): the two ranks of a step hold different numbers of labels."""
    data = make_regression_data(n)
    for i in range(0, n, 3):
        data[i]["labels"] = torch.tensor(-100.0)
    return data


class CountAllReduces(TrainerCallback):
    """DDP's all-reduces of the gradients, counted through a communication hook (registered when training
    begins, on the DDP inside the Trainer's wrappers): one per optimizer step when no_sync holds back the
    micro-batches before a step's last."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.count = trainer, 0

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = _wrappers(self.trainer.model_wrapped)
        ddp = next(m for m in ddp if isinstance(m, torch.nn.parallel.DistributedDataParallel))
        ddp.register_comm_hook(None, self._all_reduce)

    def _all_reduce(self, _, bucket):
        self.count += 1
        world = torch.distributed.get_world_size()
        future = torch.distributed.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return future.then(lambda f: f.value()[0])


def run(output_dir: str, batch_size: int, tokens: bool = False, eval_dataset=None, compute_metrics=None,
        **fields) -> Trainer:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TokenRegressor() if tokens else RegressorWithAnUnusedLayer()
    args = TrainingArguments(**{
        "output_dir": output_dir, "per_device_train_batch_size": batch_size, "max_steps": DDP_STEPS,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "steps", "save_steps": DDP_STEPS,
        "disable_tqdm": True, "use_cpu": True, "report_to": "none", "include_num_input_tokens_seen": "all", **fields,
    })
    data = masked_regression_data(32) if tokens else make_regression_data(32)
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=eval_dataset, compute_metrics=compute_metrics)
    if trainer.num_processes > 1:
        trainer.all_reduces = CountAllReduces(trainer)
        trainer.add_callback(trainer.all_reduces)
    trainer.train()
    return trainer


def result(trainer: Trainer) -> dict:
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "lrs": [h["learning_rate"] for h in trainer.state.log_history if "loss" in h],
        "weights": {n: p.detach().flatten().tolist() for n, p in trainer.model.named_parameters()},
        "world_size": trainer.num_processes,
        "total_flos": trainer.state.total_flos,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "files": sorted(os.listdir(os.path.join(trainer.args.output_dir, f"checkpoint-{DDP_STEPS}"))),
        "wrapped": [type(m).__name__ for m in _wrappers(trainer.model_wrapped)],
        "all_reduces": getattr(getattr(trainer, "all_reduces", None), "count", 0),
    }


def _wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model`` and the modules it wraps, outermost first (torch.compile's ``_orig_mod``, DDP's ``module``)."""
    chain = [model]
    while hasattr(chain[-1], "_orig_mod") or hasattr(chain[-1], "module"):
        chain.append(getattr(chain[-1], "_orig_mod", None) or chain[-1].module)
    return chain


if __name__ == "__main__":
    out = sys.argv[1]
    if sys.argv[2:] == ["compile"]:
        # accumulation: the micro-batches before a step's last run under DDP's no_sync, found inside the
        # compiled wrapper
        plain = result(run(os.path.join(out, "uncompiled"), batch_size=4, gradient_accumulation_steps=2))
        trainer = run(out, batch_size=4, gradient_accumulation_steps=2, torch_compile_backend="eager")
        outcome = {**result(trainer), "uncompiled": plain}
    elif sys.argv[2:] == ["best"]:
        # every rank computes the metric (on the gathered predictions): 0.4 at step 2 is the highest
        scores = iter([0.4, 0.2, 0.1])
        trainer = run(out, batch_size=4, eval_dataset=make_regression_data(8, seed=1),
                      compute_metrics=lambda eval_pred: {"score": next(scores)}, eval_strategy="steps",
                      eval_steps=2, save_steps=2, load_best_model_at_end=True, metric_for_best_model="score")
        with open(os.path.join(out, f"ddp_result_{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump({**result(trainer), "best": trainer.state.best_model_checkpoint}, f)
        outcome = result(trainer)
    else:
        trainer = run(out, batch_size=4, tokens=sys.argv[2:] == ["tokens"])
        outcome = result(trainer)
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "ddp_result.json"), "w") as f:
            json.dump(outcome, f)
    leave_torchrun_worker()  # after every rank wrote its files
