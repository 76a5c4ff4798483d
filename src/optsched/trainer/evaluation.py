"""The Trainer's evaluation: the eval loss, ``compute_metrics``, ``predict()``, the best metric,
metric-driven schedules.

:class:`EvaluationMixin` holds these methods of :class:`~optsched.trainer.trainer.Trainer` (``evaluate``,
``predict``, ``evaluation_loop`` and ``prediction_step`` keep transformers' names and signatures, so a
subclass overrides them as it would there); the predictions' collection is
:mod:`optsched.trainer.predictions`, ``batch_eval_metrics``' per-batch calls
:mod:`optsched.trainer.batch_metrics`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch

from optsched.trainer.batch_metrics import BatchMetrics, lockstep_batches
from optsched.trainer.data import move_to_device, split_model_inputs
from optsched.trainer.distributed import all_reduce_sum, unwrap_model
from optsched.trainer.full_eval import cast_for_evaluation, full_eval_dtype
from optsched.trainer.log_levels import logs_at_process_level
from optsched.trainer.loss_items import extract_loss, main_input_name
from optsched.trainer.predictions import (
    EvalPrediction,
    PredictionCollector,
    PredictionOutput,
    batch_labels,
    batch_main_input,
    check_ignore_keys,
    logits_from_outputs,
    prefix_metrics,
    run_compute_metrics,
    sample_losses,
)
from optsched.trainer.reporting import speed_metrics

__all__ = ["EvalLoopOutput", "EvalLossMean", "EvaluationMixin", "steps_on_metric"]


class EvalLoopOutput(NamedTuple):
    """What :meth:`EvaluationMixin.evaluation_loop` returns (transformers' fields, plus ``num_steps``:
    this process's batches, for ``<prefix>_steps_per_second``)."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, Any]
    num_samples: int
    num_steps: int = 0


def steps_on_metric(scheduler: Any) -> bool:
    """True for a scheduler stepped with an evaluation metric (:func:`optsched.schedules.is_metric_scheduler`)."""
    from optsched.schedules import is_metric_scheduler

    return scheduler is not None and is_metric_scheduler(scheduler)


class EvalLossMean:
    """An evaluation's loss: the mean of its batches' losses weighted by their sizes, as transformers takes
    the mean of each batch's loss repeated once per sample.

    With ``nonfinite_filter`` (``logging_nan_inf_filter``, transformers' default True), batches whose loss
    is NaN or infinite (e.g. a causal-LM batch whose labels are all -100) are left out, unless no batch has
    a finite loss; then, and with False, every batch counts (a NaN then gives NaN). Sums in float64, on the
    device (no synchronisation per batch), summed over DDP processes in one collective.

    Example:
        >>> m = EvalLossMean(torch.device("cpu"))
        >>> m.add(torch.tensor(1.0), 2); m.add(torch.tensor(float("nan")), 1); m.add(torch.tensor(4.0), 1)
        >>> m.result(None, nonfinite_filter=True)
        (2.0, True)
        >>> import math; math.isnan(m.result(None, nonfinite_filter=False)[0])
        True
    """

    def __init__(self, device: torch.device) -> None:
        # [sum of finite losses x n, their samples, sum of all losses x n, all samples]
        self._sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, n: int) -> None:
        """Add a batch of ``n`` samples whose mean loss is ``loss`` (a one-value tensor)."""
        weighted = loss.detach().double().reshape(()) * n
        finite = torch.isfinite(weighted)
        zero = torch.zeros((), dtype=torch.float64, device=weighted.device)
        self._sums += torch.stack((torch.where(finite, weighted, zero), finite.double() * n,
                                   weighted, torch.full_like(zero, n)))

    def result(self, dist: Any, nonfinite_filter: bool) -> tuple[float, bool]:
        """``(the mean loss, whether any batch had a loss)``, over every process under DDP (a collective:
        every process calls it); NaN when no batch had one."""
        sums = self._sums if dist is None else all_reduce_sum(self._sums, dist)
        finite_total, finite_count, total, count = sums.tolist()
        if count == 0:
            return float("nan"), False
        if nonfinite_filter and finite_count > 0:
            return finite_total / finite_count, True
        return total / count, True


def _batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (1 when none is found)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


class EvaluationMixin:
    """``evaluate()`` and what the loop does with its metrics (best checkpoint, metric-driven schedules).

    Reads the Trainer's ``args``, ``dist``, ``device``, ``model``, ``is_in_train``, ``state``, ``control``,
    ``callback_handler``, ``compute_loss_func``, ``lr_scheduler`` and ``_metric_scheduler``, and calls
    its ``_evaluation_model()``, ``get_eval_dataloader()``, ``compute_loss()``, ``_num_items()``,
    ``autocast_smart_context_manager()``, ``_float32_under_autocast()``, ``log()`` and ``_optimizer_eval_mode()``.
    """

    @logs_at_process_level
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss (sample-weighted, over all processes) and ``compute_metrics``' metrics over the eval
        dataset, logged, passed to the callbacks' ``on_evaluate`` and returned.

        Without ``compute_metrics`` no prediction is collected (the loss only, as fast as before). With
        it, the logits and labels of every batch are collected (:meth:`evaluation_loop`) and
        ``compute_metrics(EvalPrediction(predictions, label_ids))`` is called once, on every process,
        with the whole dataset in its order; its metrics are prefixed ``<prefix>_`` unless they already
        are (transformers' rule). No labels in the data: ``compute_metrics`` is not called.
        ``include_for_metrics`` / ``batch_eval_metrics``: see :meth:`evaluation_loop`.

        ``ignore_keys``: the model outputs (of a dict / ``ModelOutput``) left out of the predictions; None:
        the model config's ``keys_to_ignore_at_inference`` (``["past_key_values"]`` for a config without
        it; ``[]`` for a model without a config), as transformers.

        A ``dict`` of datasets (here or as the Trainer's ``eval_dataset``, as transformers accepts) is
        evaluated one dataset at a time, each under the prefix ``<prefix>_<name>`` (``eval_a_loss``), and
        the metrics are merged; ``metric_for_best_model`` then names one of them (``"a_loss"``).

        Returns:
            ``{"<prefix>_loss", <prefix>_<metric>..., "<prefix>_runtime", "<prefix>_samples_per_second",
            "<prefix>_steps_per_second"}``.

        Raises:
            TypeError: ``ignore_keys`` is not None or a list of names (a single string included).
        """
        ignore_keys = check_ignore_keys("ignore_keys", ignore_keys)
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(datasets, dict):
            metrics: dict[str, float] = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        self._memory_tracker.start("eval")  # inside train(): part of the train stage
        try:
            return self._evaluate_loader(self.get_eval_dataloader(eval_dataset), ignore_keys, metric_key_prefix)
        finally:
            self._memory_tracker.abandon("eval")  # an exception (else already stopped)

    def _evaluate_loader(self, loader: Any, ignore_keys: Any, metric_key_prefix: str) -> dict[str, float]:
        """:meth:`evaluate` of one dataset's loader: the loop, the speed metrics, the log, ``on_evaluate``."""
        start = time.time()
        output = self.evaluation_loop(
            loader,
            description="Evaluation",
            # no point collecting predictions nobody reads (transformers' rule too)
            prediction_loss_only=True if self.compute_metrics is None else None,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        metrics = output.metrics
        metrics.update(speed_metrics(metric_key_prefix, time.time() - start, output.num_samples, output.num_steps))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        self._memory_tracker.stop("eval", metrics)  # returned, not logged (transformers' order)
        return metrics

    @logs_at_process_level
    def predict(self, test_dataset: Any, ignore_keys: Any = None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions (and labels, and metrics when the data has labels) over ``test_dataset``, as
        transformers' ``predict()``: numpy arrays in the dataset's order, batches of different sequence
        lengths padded on the right with ``-100``. Runs the callbacks' ``on_predict``; logs nothing.
        ``ignore_keys`` as in :meth:`evaluate`.

        Returns:
            ``PredictionOutput(predictions, label_ids, metrics)``; ``label_ids`` is ``None`` without
            labels; ``metrics`` holds ``<prefix>_loss`` (when the model returned one), ``compute_metrics``'
            metrics (when set and the data has labels) and the speed metrics.

        Raises:
            TypeError: ``ignore_keys`` is not None or a list of names.
        """
        ignore_keys = check_ignore_keys("ignore_keys", ignore_keys)
        self._memory_tracker.start("test")
        try:
            loader = self.get_test_dataloader(test_dataset)
            start = time.time()
            output = self.evaluation_loop(
                loader, description="Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
            metrics = output.metrics
            metrics.update(speed_metrics(metric_key_prefix, time.time() - start, output.num_samples, output.num_steps))
            self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=metrics)
            self._memory_tracker.stop("test", metrics)
        finally:
            self._memory_tracker.abandon("test")
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=metrics)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: Any = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The loop shared by :meth:`evaluate` and :meth:`predict` (transformers' name and signature).

        ``prediction_loss_only`` None means ``args.prediction_loss_only`` (False when the arguments have
        no such field). The loss is averaged over the samples of the batches that gave one (weighted by
        batch size, summed over processes); ``<prefix>_loss`` is absent when none did.

        ``args.include_for_metrics`` adds ``inputs`` (each batch's main input, see
        :func:`~optsched.trainer.predictions.batch_main_input`) and / or ``losses`` (each sample's batch
        loss) to the ``EvalPrediction``, collected like the predictions. ``args.batch_eval_metrics`` calls
        ``compute_metrics`` on every batch instead (:mod:`optsched.trainer.batch_metrics`), and then only a
        ``description="Prediction"`` loop collects predictions. ``args.eval_accumulation_steps`` changes
        nothing: each batch goes to the CPU as it comes. ``args.eval_do_concat_batches=False`` keeps each
        of these as a list of per-batch arrays (:class:`~optsched.trainer.predictions.PredictionCollector`).
        ``args.fp16_full_eval`` / ``bf16_full_eval``: outside ``train()`` the model runs cast to float16 /
        bfloat16, its own tensors put back afterwards (:mod:`optsched.trainer.full_eval`).
        """
        args = self.args
        if prediction_loss_only is None:
            prediction_loss_only = bool(getattr(args, "prediction_loss_only", False))
        include = frozenset(getattr(args, "include_for_metrics", None) or ())
        batch_eval_metrics = bool(getattr(args, "batch_eval_metrics", False))
        per_batch = (
            BatchMetrics(self.compute_metrics, self.dist, self.device)
            if batch_eval_metrics and self.compute_metrics is not None and not prediction_loss_only
            else None
        )
        # transformers keeps no prediction of a per-batch evaluation (predict() keeps them)
        keep = not prediction_loss_only and (not batch_eval_metrics or description == "Prediction")
        self.callback_handler.eval_dataloader = dataloader
        model = self._evaluation_model()  # torch_compile: a compiled wrapper of self.model
        input_name = main_input_name(self.model)
        loss_mean = EvalLossMean(self.device)
        samples = 0
        steps = 0
        collector = PredictionCollector(concat=getattr(args, "eval_do_concat_batches", True),
                                        objects=getattr(args, "eval_use_gather_object", False)) if keep else None
        batches = (
            lockstep_batches(dataloader, self.dist, self.device) if per_batch is not None
            else ((batch, False) for batch in dataloader)
        )
        was_training = model.training
        # fp16 / bf16_full_eval outside train() (transformers' rule); inside the optimizer's eval mode, so a
        # schedule-free optimizer's train() finds its own float32 weights back
        full_eval = cast_for_evaluation(
            self.model, None if getattr(self, "is_in_train", False) else full_eval_dtype(args))
        with self._optimizer_eval_mode(), full_eval, torch.no_grad():
            model.eval()
            try:
                for batch, is_last in batches:
                    logits = labels = inputs = losses = None
                    if batch is not None:  # None: a DDP process with no batch left (per_batch only)
                        batch = move_to_device(batch, self.device)
                        n = _batch_size(batch)
                        loss, logits, labels = self.prediction_step(model, batch, prediction_loss_only, ignore_keys)
                        if loss is not None:
                            loss_mean.add(loss, n)
                        samples += n
                        steps += 1
                        if not prediction_loss_only:
                            if logits is not None and self.preprocess_logits_for_metrics is not None:
                                logits = self.preprocess_logits_for_metrics(logits, labels)
                            inputs = batch_main_input(batch, input_name) if "inputs" in include else None
                            losses = sample_losses(loss, n) if "loss" in include else None
                        if collector is not None:
                            collector.add(logits, labels, inputs, losses)
                        self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
                    if per_batch is not None:  # every DDP process, each step: the batches are gathered
                        per_batch.update(logits, labels, batch if "inputs" in include else None, losses, is_last)
            finally:
                model.train(was_training)
        eval_loss, counted = loss_mean.result(self.dist, getattr(args, "logging_nan_inf_filter", True))
        num_samples = int(all_reduce_sum(torch.tensor(float(samples), device=self.device), self.dist).item())
        predictions = label_ids = None
        metrics: dict[str, Any] = {}
        if collector is not None:
            predictions, label_ids, inputs, losses = collector.gathered(self.dist)
            if (per_batch is None and self.compute_metrics is not None and predictions is not None
                    and label_ids is not None):
                metrics = run_compute_metrics(
                    self.compute_metrics,
                    EvalPrediction(predictions=predictions, label_ids=label_ids, inputs=inputs, losses=losses),
                )
        if per_batch is not None:
            metrics = per_batch.metrics()
        if counted or prediction_loss_only:
            metrics[f"{metric_key_prefix}_loss"] = eval_loss
        return EvalLoopOutput(predictions, label_ids, prefix_metrics(metrics, metric_key_prefix), num_samples, steps)

    def prediction_step(
        self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """``(loss, logits, labels)`` of one batch (already on the device), under ``torch.no_grad()``.

        ``prediction_loss_only``: the loss only, computed as in training (:meth:`compute_loss`, given the
        batch's own label count where the loss uses one, as transformers gives it; a model that returns no
        loss raises), ``(loss, None, None)``. Otherwise the labels are taken first
        (``self.label_names`` of a dict batch, all present; the last item of a tuple batch); with labels
        the loss and outputs come from :meth:`compute_loss`, without them from the model alone (the loss
        then only when the model returns one anyway). ``logits``: the outputs other than ``loss`` and
        ``ignore_keys`` (default: the model config's ``keys_to_ignore_at_inference``, else
        ``["past_key_values"]``), one tensor or a tuple.
        """
        # the batch's own label count where the loss uses one, as transformers' prediction_step passes it; not
        # summed over DDP processes as there (it then multiplies the loss by their number: exact only for
        # processes with as many labels), and no collective a process without a batch would leave waiting
        num_items = self._num_items([inputs], across_processes=False)
        if prediction_loss_only:
            with self.autocast_smart_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items)
            return loss.detach(), None, None
        if ignore_keys is None:  # transformers' default: a model with a config, its keys_to_ignore_at_inference
            base = unwrap_model(model)
            ignore_keys = (
                list(getattr(base.config, "keys_to_ignore_at_inference", ["past_key_values"]))
                if hasattr(base, "config") else []
            )
        labels = batch_labels(inputs, self.label_names)
        with self.autocast_smart_context_manager():
            if labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items)
            else:
                model_args, kwargs, _ = split_model_inputs(inputs, take_labels=False)
                outputs = self._float32_under_autocast(model(*model_args, **kwargs))
                loss = None
        # the loss the outputs carry: None when the Trainer computed it (smoothing, compute_loss_func)
        own_loss = extract_loss(outputs)
        if loss is None:
            loss = own_loss
        logits = logits_from_outputs(outputs, list(ignore_keys), has_loss=own_loss is not None)
        return (loss.detach() if loss is not None else None), logits, labels

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
