"""The Trainer's evaluation: the eval loss, the best metric, metric-driven schedules.

:class:`EvaluationMixin` holds these methods of :class:`~optsched.trainer.trainer.Trainer` (``evaluate``
keeps transformers' name and signature, so a subclass overrides it as it would there).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from optsched.trainer.data import move_to_device
from optsched.trainer.loss_items import count_label_items
from optsched.trainer.distributed import all_reduce_sum

__all__ = ["EvaluationMixin", "steps_on_metric"]


def steps_on_metric(scheduler: Any) -> bool:
    """True for a scheduler stepped with an evaluation metric (:func:`optsched.schedules.is_metric_scheduler`)."""
    from optsched.schedules import is_metric_scheduler

    return scheduler is not None and is_metric_scheduler(scheduler)


def _batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (1 when none is found)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


class EvaluationMixin:
    """``evaluate()`` and what the loop does with its metrics (best checkpoint, metric-driven schedules).

    Reads the Trainer's ``args``, ``dist``, ``device``, ``model``, ``state``, ``control``,
    ``callback_handler``, ``compute_loss_func``, ``lr_scheduler`` and ``_metric_scheduler``, and calls
    its ``get_eval_dataloader()``, ``compute_loss()``, ``autocast_smart_context_manager()``, ``log()``
    and ``_optimizer_eval_mode()``.
    """

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Average loss over the eval dataset (sample-weighted, over all processes), logged and returned.

        A ``dict`` of datasets (here or as the Trainer's ``eval_dataset``, as transformers accepts) is
        evaluated one dataset at a time, each under the prefix ``<prefix>_<name>`` (``eval_a_loss``), and
        the metrics are merged; ``metric_for_best_model`` then names one of them (``"a_loss"``).

        Returns:
            ``{"<prefix>_loss", "<prefix>_runtime", "<prefix>_samples_per_second",
            "<prefix>_steps_per_second"}``.
        """
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(datasets, dict):
            metrics: dict[str, float] = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        loader = self.get_eval_dataloader(eval_dataset)
        self.callback_handler.eval_dataloader = loader
        model = self.model
        start = time.time()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        was_training = model.training
        with self._optimizer_eval_mode(), torch.no_grad():
            model.eval()
            try:
                for batch in loader:
                    batch = move_to_device(batch, self.device)
                    n = _batch_size(batch)
                    num_items = (
                        count_label_items([batch], shift_labels=self._loss_shifts_labels)
                        if self.compute_loss_func is not None
                        else None
                    )
                    with self.autocast_smart_context_manager():
                        loss = self.compute_loss(model, batch, num_items_in_batch=num_items)
                    total += loss.detach().double().reshape(()) * n
                    count += n
                    steps += 1
                    self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
            finally:
                model.train(was_training)
        total, count = all_reduce_sum(total, self.dist), all_reduce_sum(count, self.dist)
        runtime = time.time() - start
        metrics = {
            f"{metric_key_prefix}_loss": float(total / count) if count > 0 else float("nan"),
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(float(count) / runtime, 3) if runtime > 0 else 0.0,
            f"{metric_key_prefix}_steps_per_second": round(steps / runtime, 3) if runtime > 0 else 0.0,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def _metric_name(self) -> str:
        name = self.args.metric_for_best_model or "loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    def _step_metric_scheduler(self, metrics: dict[str, float]) -> None:
        if not self._metric_scheduler:
            return
        key = self._metric_name()
        if key not in metrics:
            raise ValueError(
                f"metric_for_best_model={self.args.metric_for_best_model!r} names {key!r}, which the evaluation "
                f"did not return; accepted: one of {sorted(metrics)}."
            )
        self.lr_scheduler.step(metrics[key])

    def _update_best_metric(self, metrics: dict[str, float]) -> bool:
        if self.args.metric_for_best_model is None:
            return False
        key = self._metric_name()
        if key not in metrics:
            raise ValueError(
                f"metric_for_best_model={self.args.metric_for_best_model!r} names {key!r}, which the evaluation "
                f"did not return; accepted: one of {sorted(metrics)}."
            )
        value, best = metrics[key], self.state.best_metric
        greater = bool(self.args.greater_is_better)
        if best is None or (value > best if greater else value < best):
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
            return True
        return False
