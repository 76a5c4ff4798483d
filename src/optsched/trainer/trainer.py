"""The Trainer: transformers' ``Trainer`` API over optsched's optimizer, param groups and schedules.

It composes the public functions a user would call (``optsched.optim.create_optimizer``,
``optsched.schedules.create_scheduler``, ``optsched.params.get_decay_parameter_names``) and owns no
optimizer or schedule logic of its own. What it adds is the loop:

* step counting as transformers (see :mod:`optsched.trainer.data`), gradient accumulation whose last,
  partial group of an epoch is scaled by its own size, ``max_grad_norm`` clipping, bf16 / fp16 autocast
  (the model's outputs made float32 for the loss functions and metrics, as accelerate makes them:
  :mod:`optsched.trainer.mixed_precision`), CUDA when available unless ``use_cpu``;
* logging every ``logging_steps`` into ``state.log_history``, ``<output_dir>/log_history.jsonl`` and a
  tqdm bar; evaluation by ``eval_strategy``; metric-driven schedules stepped on the eval metric;
  schedule-free optimizers switched to ``eval()`` around evaluation and checkpointing;
* checkpoints in transformers' layout, written atomically with a CRC-32 of every file
  (:mod:`optsched.trainer.checkpoint`; :mod:`optsched.trainer.optimizer_state` stores GaLore / APOLLO
  projector objects as data), and
  an exact resume: model, optimizer, scheduler, RNG states and data position; how much a resume checks
  the files is ``args.checkpoint_verification`` (``"full"`` by default, or ``"size"``);
* DDP under ``torchrun`` (:mod:`optsched.trainer.distributed`); with ``torch_compile`` the loop trains
  ``torch.compile(DDP(model))`` and evaluation a compiled ``model``, while ``self.model`` stays the model
  passed (:mod:`optsched.trainer.compile`); ``neftune_noise_alpha`` hooks NEFTune's noise on the input
  embeddings for the duration of ``train()`` (:mod:`optsched.trainer.neftune`).
* ``log_level`` (and ``log_level_replica``, ``log_on_each_node``) holds for the constructor and each public
  call that logs (:mod:`optsched.trainer.log_levels`); the constructor seeds (``full_determinism``:
  deterministic torch, :mod:`optsched.trainer.determinism`) and sets ``tf32`` (:mod:`optsched.trainer.tf32`).
* reliability (docs/reliability.md): a step with a NaN / inf loss or gradient norm is skipped, optimizer
  and scheduler both, and ``max_consecutive_nonfinite`` skips in a row stop training
  (:mod:`optsched.trainer.nonfinite`); NaN / inf weights are never saved; SIGTERM / SIGINT save a
  checkpoint at the current step and end ``train()`` cleanly (:mod:`optsched.trainer.signals`,
  ``trainer.preempted_by``); damaged or untrusted checkpoint files raise ``CheckpointError``.

The class is composed of mixins, one job each: :class:`~optsched.trainer.update.UpdateMixin` (backward,
clipping, ``optimizer.step()``, including optimizers that update inside ``backward``, see
:func:`optimizer_update_mode`), :class:`~optsched.trainer.checkpointing.CheckpointMixin` (save and
resume), :class:`~optsched.trainer.best_model.BestModelMixin` (how ``train()`` ends with a best checkpoint:
``load_best_model_at_end``), :class:`~optsched.trainer.evaluation.EvaluationMixin` (``evaluate`` and the best metric) and
:class:`~optsched.trainer.dataloaders.DataLoaderMixin` (the DataLoaders and the position in the data)
and :class:`~optsched.trainer.reporting.ReportingMixin` (``log_metrics`` / ``save_metrics`` /
``save_state`` of transformers' example scripts). This module keeps the constructor, the optimizer / scheduler factories, precision, one training step,
the loop, logging and callbacks.

Per-step cost: the loop does no work proportional to the number of modules. ``model.train()`` runs
once per ``train()`` and after each evaluation (a step re-enables it only if the model was left in eval
mode), the parameter list used for clipping is built once per ``train()``, gradients are released with
``optimizer.zero_grad(set_to_none=True)`` (plus the few trainable parameters the optimizer does not
hold), and the loss stays a tensor until logging time.

Loss scaling (transformers' rules, :mod:`optsched.trainer.loss_items`): ``num_items_in_batch`` is the
number of labels ``!= -100`` over the whole optimizer step (``labels[..., 1:]`` for a causal LM), summed
over processes with ``average_tokens_across_devices``, a float32 tensor as transformers passes it (an
evaluation batch's own count, not summed). A model whose loss uses it (``accepts_loss_kwargs``, else a
``forward`` that names it or hands ``**kwargs`` to ``self.loss_function``) is given it with dict
batches that have labels, and ``compute_loss_func(outputs, labels, num_items_in_batch)`` always: their
loss is used as returned, the step's gradient being the mean over its tokens. Any other loss is divided
by the number of micro-batches in its optimizer step (``gradient_accumulation_steps``, or fewer for the
last step of an epoch), so the step's gradient is the mean over its batches. Under DDP a loss normalised
by the count of every process is multiplied by the number of processes, since DDP averages gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from optsched.arguments import torch_compile_settings
from optsched.params.classify import unwrap_compiled
from optsched.trainer import checkpoint as ckpt
from optsched.trainer.auto_batch_size import BatchSizeSearch
from optsched.trainer.batch_metrics import check_compute_result_parameter
from optsched.trainer.best_model import BestModelMixin
from optsched.trainer.callbacks import (
    CallbackHandler,
    LOG_FILE_NAME,
    DefaultFlowCallback,
    JsonLinesLoggerCallback,
    ProgressCallback,
    strategy_name,
)
from optsched.trainer.checkpointing import CheckpointMixin
from optsched.trainer.collate import default_data_collator
from optsched.trainer.compile import compile_model
from optsched.trainer.data import TrainingPlan, has_length, move_to_device, split_model_inputs
from optsched.trainer.dataloaders import DataLoaderMixin
from optsched.trainer.determinism import enable_full_determinism, set_seed
from optsched.trainer.distributed import (
    all_reduce_sum,
    empty_device_cache,
    init_distributed,
    no_sync,
    resolve_device,
    unwrap_model,
    wrap_model,
)
from optsched.trainer.evaluation import EvaluationMixin, steps_on_metric
from optsched.trainer.flops import FlopsMixin
from optsched.trainer.label_smoothing import make_label_smoother
from optsched.trainer.log_levels import logs_at_process_level, optsched_log_level, process_log_level
from optsched.trainer.loss_items import extract_loss, loss_shifts_labels, main_input_name, model_accepts_loss_kwargs
from optsched.trainer.memory_metrics import MemoryTracker
from optsched.trainer.mixed_precision import float32_outputs
from optsched.trainer.neftune import input_embeddings, neftune_noise
from optsched.trainer.nonfinite import NonFiniteGuard
from optsched.trainer.overflow_debug import DebugUnderflowOverflow
from optsched.trainer.predictions import check_ignore_keys, find_labels
from optsched.trainer.reporting import ReportingMixin, speed_metrics
from optsched.trainer.signals import PreemptionHandler
from optsched.trainer.state import TrainerControl, TrainerState
from optsched.trainer.tf32 import apply_tf32
from optsched.trainer.tokens_seen import TokenCounter
from optsched.trainer.update import (
    _BACKWARDS,
    UPDATE_MODES,
    UpdateMixin,
    _has_mode_switch,
    optimizer_update_mode,
)

logger = logging.getLogger(__name__)

__all__ = ["UPDATE_MODES", "TrainOutput", "Trainer", "optimizer_update_mode", "set_seed", "steps_on_metric"]


class TrainOutput(NamedTuple):
    """What ``train()`` returns (transformers' fields)."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


#: transformers' Trainer keywords that optsched's accepts (same names, same positions) but refuses
#: when given: what each would do there, and what to do instead. Never dropped without a word.
_UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "processing_class": (
        "transformers saves it (a tokenizer, image processor, ...) into every checkpoint and in "
        "save_model(), and builds a padding collator from it; optsched's Trainer does neither. "
        "Accepted: processing_class=None; pass data_collator= (e.g. transformers' "
        "DataCollatorWithPadding(tokenizer)) and call processing_class.save_pretrained(output_dir) yourself"
    ),
    "model_init": (
        "it is for transformers' hyperparameter_search, which optsched does not have. Accepted: "
        "model_init=None and Trainer(model=model_init(), ...)"
    ),
}


def _refuse_unsupported(**given: Any) -> None:
    """Raise ``TypeError`` for a transformers Trainer keyword optsched does not honour, set to anything
    but ``None``: a user who swaps the import gets told, not a Trainer that quietly does less."""
    for name, value in given.items():
        if value is not None:
            raise TypeError(
                f"Trainer({name}=...) is not supported by optsched's Trainer (got {type(value).__name__}): "
                f"{_UNSUPPORTED_KEYWORDS[name]}."
            )


class Trainer(UpdateMixin, CheckpointMixin, BestModelMixin, EvaluationMixin, DataLoaderMixin, ReportingMixin,
              FlopsMixin):
    """Train a PyTorch model the way ``transformers.Trainer`` does, with optsched's optimizers and schedules.

    The optimizer is created in the constructor (``trainer.optimizer.param_groups`` can be inspected
    right away); the scheduler by :meth:`create_scheduler` or when :meth:`train` starts, once the number
    of steps is known. A subclass may override :meth:`create_optimizer` with no argument (the seed's
    ``def create_optimizer(self)``): the Trainer always calls ``self.create_optimizer()`` without
    arguments and then reads ``self.optimizer``.

    Args:
        model: the ``torch.nn.Module`` to train; its forward returns the loss (``.loss``, ``["loss"]``,
            or first in a tuple, as a transformers model with ``return_dict=False``) unless
            ``compute_loss_func`` is given.
        args: optsched's or transformers' ``TrainingArguments`` (``None``: defaults, output in
            ``trainer_output``).
        train_dataset / eval_dataset: map-style datasets (shuffled by ``data_seed``) or iterable ones
            (read in order; need ``max_steps``); ``eval_dataset`` may be a dict of them, evaluated one by
            one under ``eval_<name>_...`` metrics (see :meth:`evaluate`).
        data_collator: the DataLoader's ``collate_fn`` (default: transformers' ``default_data_collator``
            for dict samples, torch's ``default_collate`` for others: :mod:`optsched.trainer.collate`).
            With ``remove_unused_columns`` (the default) it gets dict samples without the keys the
            model's ``forward`` does not name.
        compute_metrics: ``f(EvalPrediction) -> dict``, called by :meth:`evaluate` / :meth:`predict` on the
            whole eval set's predictions and labels (numpy; plus ``inputs`` / ``losses`` with
            ``include_for_metrics``), as transformers does; with ``batch_eval_metrics``,
            ``f(EvalPrediction, compute_result) -> dict`` on every batch (:mod:`optsched.trainer.batch_metrics`).
        preprocess_logits_for_metrics: ``f(logits, labels) -> tensor``, applied to each eval batch's
            logits before they are collected (e.g. an argmax, to keep a causal LM's logits small).
        processing_class / model_init: transformers' keywords, in its positions, so a call written for it
            binds the same; optsched does not honour them, so anything but ``None`` raises ``TypeError``
            saying what to do instead.
        optimizers: ``(optimizer, lr_scheduler)``; either may be None to have it created.
        optimizer_cls_and_kwargs: ``(cls, kwargs)`` for :func:`optsched.optim.create_optimizer`; not
            together with ``optimizers[0]``.
        compute_loss_func: ``f(outputs, labels, num_items_in_batch) -> loss`` (see the module docstring).
        callbacks: :class:`~optsched.trainer.callbacks.TrainerCallback` instances or classes, added after
            the default flow, JSON-lines log and progress bar callbacks.

    Raises:
        TypeError: a model that is not an ``nn.Module``, malformed ``optimizers``, a non-callable
            ``compute_loss_func`` / ``compute_metrics`` / ``preprocess_logits_for_metrics``;
            ``processing_class`` or ``model_init`` given.
        ValueError: ``optimizers`` and ``optimizer_cls_and_kwargs`` together; a model with no trainable
            parameter; fp16 without CUDA (``fp16_full_eval`` runs on the CPU, as in transformers); bf16 or
            ``bf16_full_eval`` on a CUDA device without bf16; ``batch_eval_metrics`` with a
            ``compute_metrics`` that has no ``compute_result`` parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[[Any], dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[Any, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from optsched.arguments import as_training_arguments

        _refuse_unsupported(
            processing_class=processing_class,
            model_init=model_init,
        )
        for name, fn in (("compute_metrics", compute_metrics), ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"{name} must be callable or None, got {type(fn).__name__} {fn!r:.80}; accepted: "
                    + ("f(eval_pred) -> dict of metrics, eval_pred an optsched.EvalPrediction (predictions, label_ids)."
                       if name == "compute_metrics" else "f(logits, labels) -> tensor, called on each eval batch.")
                )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}.")
        if not (isinstance(optimizers, (tuple, list)) and len(optimizers) == 2):
            raise TypeError(
                f"optimizers must be a pair (optimizer, lr_scheduler), either may be None; got {optimizers!r}."
            )
        if optimizers[0] is not None and optimizer_cls_and_kwargs is not None:
            raise ValueError(
                "optimizers=(optimizer, ...) and optimizer_cls_and_kwargs were both given; accepted: one of "
                "them (an optimizer instance, or the class and kwargs to build one)."
            )
        if compute_loss_func is not None and not callable(compute_loss_func):
            raise TypeError(f"compute_loss_func must be callable, got {type(compute_loss_func).__name__}.")
        if data_collator is not None and not callable(data_collator):
            raise TypeError(
                f"data_collator must be callable (a list of samples -> a batch), got {type(data_collator).__name__}; "
                "it is the third positional parameter, as in transformers' Trainer(model, args, data_collator, "
                "train_dataset, eval_dataset, ...): pass a dataset as train_dataset=... / eval_dataset=...."
            )

        self.args = as_training_arguments(args)
        if self.args.eval_strategy != "no" and eval_dataset is None:
            # transformers refuses it here too; found later it would fail at the first evaluation,
            # possibly hours in and before that step's checkpoint is written.
            raise ValueError(
                f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset, and none was given; "
                "accepted: Trainer(..., eval_dataset=...), or eval_strategy='no'."
            )
        self.dist = init_distributed(
            use_cpu=self.args.use_cpu, backend=self.args.ddp_backend, timeout_s=self.args.ddp_timeout
        )
        self.device = resolve_device(self.args.use_cpu, self.dist.local_rank)
        self._memory_tracker = MemoryTracker(not getattr(self.args, "skip_memory_metrics", True), self.device)
        self._memory_tracker.start("init")
        # the rest of the constructor logs at log_level, as each call that logs does (trainer.log_levels)
        with optsched_log_level(process_log_level(self.args, local_rank=self.dist.local_rank, rank=self.dist.rank)):
            if self.args.report_to and self.dist.is_main_process:
                # not refused: transformers 4's default ("all", made the installed integrations' names) comes
                # with every TrainingArguments it builds
                logger.warning(
                    "report_to=%r: optsched's Trainer has no reporting integrations, nothing is sent to %s. "
                    "The logs go to trainer.state.log_history and %s; a TrainerCallback's on_log(logs=...) can "
                    "forward them. Accepted: report_to='none' (silences this).",
                    self.args.report_to, " or ".join(self.args.report_to),
                    os.path.join(str(self.args.output_dir), LOG_FILE_NAME),
                )
            self._check_precision()
            apply_tf32(self.args.tf32)
            # transformers seeds here too; full_determinism also makes torch deterministic, process-wide
            (enable_full_determinism if self.args.full_determinism else set_seed)(self.args.seed)

            self.model = model.to(self.device)
            self.model_wrapped: nn.Module = self.model
            self.train_dataset = train_dataset
            self.eval_dataset = eval_dataset
            self.data_collator = data_collator if data_collator is not None else default_data_collator
            self.compute_loss_func = compute_loss_func
            self.compute_metrics = compute_metrics
            if compute_metrics is not None and getattr(self.args, "batch_eval_metrics", False):
                check_compute_result_parameter(compute_metrics)
            self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
            # transformers' public attribute: the batch keys collected as label_ids (args.label_names, else
            # find_labels' rule)
            self.label_names: list[str] = (
                list(self.args.label_names) if getattr(self.args, "label_names", None) is not None
                else find_labels(unwrap_compiled(self.model))
            )
            # transformers' public attribute (a user may set it): num_items_in_batch goes to the model,
            # whose loss then needs no division by the accumulation steps (trainer.loss_items)
            self.model_accepts_loss_kwargs = model_accepts_loss_kwargs(self.model)
            self._loss_shifts_labels = loss_shifts_labels(self.model)
            self.label_smoother = make_label_smoother(unwrap_compiled(self.model), self.args.label_smoothing_factor)
            config = getattr(self.model, "config", None)
            if config is not None and hasattr(config, "use_cache"):  # transformers' Trainer does it here too
                config.use_cache = self.args.use_cache
            if self.args.neftune_noise_alpha is not None:
                input_embeddings(self.model, self.args.neftune_noise_alpha)  # refused now, not at train()
            self._auto_batch_size: int | None = None  # auto_find_batch_size's batch being tried
            self._initial_step: int | None = None
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
            self.optimizer, self.lr_scheduler = optimizers
            self._created_lr_scheduler = False
            self.scaler = self._make_grad_scaler()
            self._current_accumulation = 1
            # set per train() (see _prepare_step_state); training_step() also works outside train()
            self._update_mode = "step"
            self._clip_params: list[nn.Parameter] | None = None
            self._grad_extras: list[nn.Parameter] = []
            self._metric_scheduler = False
            self._inner_grad_norm: torch.Tensor | None = None
            self._logged_no_clip = False
            self.preempted_by: str | None = None  # the signal that stopped the last train() (optsched.trainer.signals)
            self._ignore_keys_for_eval: list[str] | None = None  # train(ignore_keys_for_eval=...), for its evaluations
            # transformers' public flag: True inside train(), where fp16_full_eval / bf16_full_eval do not cast
            self.is_in_train = False

            self.state = TrainerState(
                is_local_process_zero=self.dist.local_rank == 0, is_world_process_zero=self.dist.is_main_process
            )
            self.control = TrainerControl()
            default_callbacks: list[Any] = [DefaultFlowCallback(), JsonLinesLoggerCallback()]
            if not self.args.disable_tqdm:
                default_callbacks.append(ProgressCallback())
            self.callback_handler = CallbackHandler(default_callbacks + list(callbacks or []), self.model)

            # "Each creates appropriate optimizer when Trainer initializes" (the seed): build it now.
            self._ensure_optimizer()
            self._update_mode = optimizer_update_mode(self.optimizer)
            self._check_update_mode()  # fail at construction, not after the first epoch's data is loaded
            self.callback_handler.optimizer = self.optimizer
            self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
            self._memory_tracker.stop("init")

    # ---- optimizer and scheduler (transformers' names; logic lives in optsched.optim / .schedules) ----

    @logs_at_process_level
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Set up ``self.optimizer`` with :func:`optsched.optim.create_optimizer` unless it is already set.

        Honours ``optimizer_cls_and_kwargs`` and a subclass's overrides of
        :meth:`get_optimizer_cls_and_kwargs` and :meth:`get_decay_parameter_names`, as transformers
        does. Returns ``self.optimizer``.
        """
        if self.optimizer is None:
            from optsched.optim import create_optimizer

            from optsched.params import unwrap_compiled

            # A torch.compile'd model is grouped by its own names (create_optimizer does the same), and
            # an overridden get_decay_parameter_names must name them so, or nothing would decay.
            opt_model = unwrap_compiled(self.model if model is None else model)
            self._check_trainable(opt_model)
            cls_and_kwargs = self.optimizer_cls_and_kwargs
            if cls_and_kwargs is None and type(self).get_optimizer_cls_and_kwargs is not Trainer.get_optimizer_cls_and_kwargs:
                cls_and_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            args = self.args
            if type(self).get_decay_parameter_names is not Trainer.get_decay_parameter_names:
                # HF's create_optimizer groups by self.get_decay_parameter_names: honour a subclass's
                # override by turning its names into the decay policy the group builder applies.
                decay_names = frozenset(self.get_decay_parameter_names(opt_model))
                args = dataclasses.replace(args, decay_policy=lambda info: info.name in decay_names)
            self.optimizer = create_optimizer(opt_model, args, cls_and_kwargs, num_training_steps=self._planned_steps())
        return self.optimizer

    @logs_at_process_level
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Set up ``self.lr_scheduler`` with :func:`optsched.schedules.create_scheduler` unless already set.

        Args:
            num_training_steps: total optimizer steps the schedule spans.
            optimizer: the optimizer to schedule (default ``self.optimizer``).

        Raises:
            ValueError: no optimizer given and ``self.optimizer`` is None.
        """
        if self.lr_scheduler is None:
            from optsched.schedules import create_scheduler

            optimizer = self.optimizer if optimizer is None else optimizer
            if optimizer is None:
                raise ValueError(
                    "create_scheduler() needs an optimizer: call create_optimizer() first or pass optimizer=."
                )
            self.lr_scheduler = create_scheduler(optimizer, self.args, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """``create_optimizer()`` then ``create_scheduler(num_training_steps)`` (each honours overrides)."""
        self._ensure_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
        """The optimizer class and kwargs ``args`` ask for (:func:`optsched.optim.get_optimizer_cls_and_kwargs`)."""
        from optsched.optim import get_optimizer_cls_and_kwargs

        return get_optimizer_cls_and_kwargs(args, model)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters weight decay applies to (:func:`optsched.params.get_decay_parameter_names`)."""
        from optsched.params import get_decay_parameter_names

        return get_decay_parameter_names(model)

    def _ensure_optimizer(self) -> None:
        """Call ``self.create_optimizer()`` (no argument: a subclass's override may take none) if needed."""
        if self.optimizer is not None:
            return
        returned = self.create_optimizer()
        if self.optimizer is None and returned is not None:
            self.optimizer = returned  # an override that returns the optimizer without assigning it
        if self.optimizer is None:
            raise ValueError(
                f"{type(self).__name__}.create_optimizer() left self.optimizer as None; an override must set "
                "self.optimizer to a torch.optim.Optimizer."
            )
        for attr in ("step", "zero_grad", "state_dict", "load_state_dict", "param_groups"):
            if not hasattr(self.optimizer, attr):
                raise TypeError(
                    f"self.optimizer is a {type(self.optimizer).__name__} without {attr!r}; accepted: a "
                    "torch.optim.Optimizer."
                )

    def _check_trainable(self, model: nn.Module) -> None:
        params = list(model.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError(
                f"the model ({type(model).__name__}) has no trainable parameter: all {len(params)} parameters "
                "have requires_grad=False, so there is nothing to optimize. Unfreeze some parameters."
            )

    def _planned_steps(self) -> int | None:
        """The run's total steps when the training set has a length (used by schedule-free warmup ratios)."""
        if self.train_dataset is None or not has_length(self.train_dataset):
            return None if self.args.max_steps <= 0 else self.args.max_steps
        try:
            return self._plan(len(self._new_train_loader())).max_steps
        except ValueError:
            return None

    # ---- precision and device -------------------------------------------------------------------------

    def _check_precision(self) -> None:
        if self.args.fp16 and self.device.type != "cuda":
            raise ValueError(
                f"fp16=True needs a CUDA device, but the Trainer runs on {self.device.type!r}; accepted: "
                "bf16=True (supported on CPU) or fp16=False."
            )
        for name in ("bf16", "bf16_full_eval"):
            if getattr(self.args, name) and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise ValueError(f"{name}=True but this CUDA device has no bfloat16 support; accepted: "
                                 f"{name.replace('bf16', 'fp16')}=True or {name}=False.")

    def _make_grad_scaler(self) -> Any:
        return torch.amp.GradScaler("cuda") if self.args.fp16 else None

    def _float32_under_autocast(self, outputs: Any) -> Any:
        """The model's ``outputs`` with float16 / bfloat16 tensors made float32 under ``bf16`` / ``fp16``
        autocast (:func:`~optsched.trainer.mixed_precision.float32_outputs`, accelerate's rule), as they are."""
        return float32_outputs(outputs) if self.args.bf16 or self.args.fp16 else outputs

    def autocast_smart_context_manager(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in bf16 / fp16 when asked for, else a no-op."""
        if self.args.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.args.fp16:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _outside_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast switched off for what comes after the forward (``compute_loss_func``, label smoothing):
        accelerate autocasts the model's ``forward`` alone, so in transformers' Trainer a loss function's
        matmuls run in float32 on the float32 outputs; inside optsched's autocast they would run in
        bfloat16 / float16. (The Trainer's autocast encloses ``compute_loss`` so that an override calling
        ``model(...)`` keeps it, as accelerate's wrapped forward does.)"""
        if self.args.bf16 or self.args.fp16:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return contextlib.nullcontext()

    # ---- one step -----------------------------------------------------------------------------------

    def compute_loss(
        self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The loss of one batch: the model's ``.loss`` / ``["loss"]`` / ``outputs[0]`` of a tuple, or
        ``compute_loss_func``'s.

        Raises:
            ValueError: the model returned no loss and no ``compute_loss_func`` was given.
        """
        use_func = self.compute_loss_func is not None
        smoother = self.label_smoother
        args, kwargs, labels = split_model_inputs(inputs, take_labels=use_func or smoother is not None)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None and isinstance(inputs, Mapping):
            kwargs["num_items_in_batch"] = num_items_in_batch  # the model's loss: sum / the step's count
        outputs = self._float32_under_autocast(model(*args, **kwargs))
        if use_func:
            with self._outside_autocast():
                loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif smoother is not None and labels is not None:
            with self._outside_autocast():
                loss = smoother(outputs, labels, shift_labels=self._loss_shifts_labels,
                                num_items_in_batch=num_items_in_batch)
        else:
            loss = extract_loss(outputs)
            if loss is None:
                keys = list(inputs) if isinstance(inputs, dict) else f"a {type(inputs).__name__}"
                raise ValueError(
                    f"the model ({type(unwrap_model(model)).__name__}) returned no loss (output type "
                    f"{type(outputs).__name__}) for a batch with keys {keys}. Accepted: a model that returns "
                    "a loss (`.loss`, `['loss']` or a tuple (loss, ...), e.g. when the batch has 'labels'), or "
                    "Trainer(compute_loss_func=f) with f(outputs, labels, num_items_in_batch) -> loss."
                )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"the loss must be a scalar tensor, got {type(loss).__name__}"
                f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}."
            )
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward one micro-batch; return its detached, accumulation-scaled loss.

        ``train()`` puts the model in training mode once (and again after each evaluation); here it is
        only re-enabled when something left the model in eval mode (``model.train()`` walks every module,
        too costly for every step). The backward is the optimizer's (:func:`optimizer_update_mode`).
        """
        if not model.training:
            model.train()
        inputs = move_to_device(inputs, self.device)
        with self.autocast_smart_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if loss.ndim:
            loss = loss.reshape(())
        # A loss normalised by the step's label count (compute_loss_func, or a model given
        # num_items_in_batch) is already its share of the step's mean: no division by the accumulation.
        normalised = self.compute_loss_func is not None or (
            num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.label_smoother is not None)
        )
        if not normalised:
            if self._current_accumulation != 1:  # x / 1 == x: skipping the op changes no bit
                loss = loss / self._current_accumulation
        elif num_items_in_batch is not None and self.dist.enabled and self.args.average_tokens_across_devices:
            loss = loss * self.dist.world_size  # DDP averages gradients; the loss used the global count
        getattr(self, _BACKWARDS[self._update_mode])(loss)
        steps = self.args.torch_empty_cache_steps
        if steps is not None and self.state.global_step % steps == 0:
            empty_device_cache(self.device)
        return loss.detach()

    def _get_learning_rate(self) -> float:
        if self._metric_scheduler or not hasattr(self.lr_scheduler, "get_last_lr"):
            lr = self.optimizer.param_groups[0]["lr"]
        else:
            lr = self.lr_scheduler.get_last_lr()[0]
        return float(lr.item() if torch.is_tensor(lr) else lr)

    @contextlib.contextmanager
    def _optimizer_eval_mode(self) -> Iterator[None]:
        """Switch a schedule-free optimizer to ``eval()`` (averaged weights) and back to its prior mode."""
        if not _has_mode_switch(self.optimizer):
            yield
            return
        was_training = self.optimizer.param_groups[0].get("train_mode", True)
        self.optimizer.eval()
        try:
            yield
        finally:
            if was_training:
                self.optimizer.train()

    # ---- training ----------------------------------------------------------------------------------

    @logs_at_process_level
    def train(
        self,
        resume_from_checkpoint: str | os.PathLike | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Train for ``max_steps`` optimizer steps (or ``num_train_epochs``), optionally resuming.

        Args:
            resume_from_checkpoint: a checkpoint directory, or True for the newest complete checkpoint in
                ``output_dir``. Model, optimizer, scheduler, RNG states and the data position are
                restored; already consumed batches are skipped. If the arguments now describe another
                schedule, the lr follows the new one from the resumed step (see
                :mod:`optsched.trainer.resume`).
            trial: transformers' hyperparameter-search trial; only ``None`` is accepted.
            ignore_keys_for_eval: the model output names the evaluations during training leave out of the
                predictions (:meth:`evaluate`'s ``ignore_keys``; None: the model config's
                ``keys_to_ignore_at_inference``).

        A signal in ``args.save_signals`` (when ``save_on_signal``) ends the call early, after the current
        step, with a checkpoint at that step; ``self.preempted_by`` then names the signal.

        Returns:
            ``TrainOutput(global_step, training_loss, metrics)``.

        Raises:
            NonFiniteError: more than ``max_consecutive_nonfinite`` non-finite steps in a row, or NaN / inf
                weights about to be saved.
            CheckpointError: a damaged or untrusted file in the checkpoint to resume from (names it), or, with
                ``load_best_model_at_end``, in the best checkpoint when training ends (the model then keeps
                the last step's weights: :mod:`optsched.trainer.best_model`).
            ValueError: no train dataset; no checkpoint found; param groups that no longer match the
                checkpoint's; a dataset without length and no ``max_steps``.
            TypeError: an unknown keyword; a ``trial``; ``ignore_keys_for_eval`` not a list of names.
        """
        if kwargs:
            raise TypeError(
                f"train() got unexpected keyword arguments {sorted(kwargs)}; accepted: resume_from_checkpoint, "
                "trial (None), ignore_keys_for_eval."
            )
        if trial is not None:
            raise TypeError(
                f"train(trial=...) is not supported (got {type(trial).__name__}): it is for "
                "transformers' hyperparameter_search, which optsched does not have; accepted: trial=None, "
                "with the trial's hyperparameters set on the TrainingArguments."
            )
        self._ignore_keys_for_eval = check_ignore_keys("ignore_keys_for_eval", ignore_keys_for_eval)
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        self.is_in_train = True
        self._memory_tracker.start("train")
        try:
            if getattr(self.args, "auto_find_batch_size", False):
                return self._search_batch_size(checkpoint)
            return self._train_from(checkpoint)
        except ckpt.CheckpointError as exc:
            if resume_from_checkpoint is True and checkpoint is not None:
                raise self._with_previous_checkpoint_hint(exc, checkpoint) from None
            raise
        finally:
            self.is_in_train = False
            self._memory_tracker.abandon("train")  # an exception: no train metrics (else already stopped)

    @property
    def _train_batch_size(self) -> int:
        """The per-device training batch: ``per_device_train_batch_size``, or while ``auto_find_batch_size``
        searches, the size being tried (:mod:`optsched.trainer.auto_batch_size`). transformers' attribute name."""
        return getattr(self, "_auto_batch_size", None) or self.args.per_device_train_batch_size

    def _check_output_dir(self) -> None:
        """Create ``output_dir`` and probe it, now (:func:`~optsched.trainer.checkpoint.make_writable_dir`):
        a path that cannot hold the run's files (a file, a read-only place) would otherwise fail at the
        first save, after that much training."""
        path = Path(self.args.output_dir)
        try:
            ckpt.make_writable_dir(path)
        except OSError as exc:
            raise ValueError(
                f"output_dir={str(path)!r} cannot hold the run's logs and checkpoints "
                f"({exc.strerror or exc}: {exc.filename or path}); accepted: a directory this process can "
                "write to (created if missing)."
            ) from None

    def _search_batch_size(self, checkpoint: Path | None) -> TrainOutput:
        """``auto_find_batch_size``: :meth:`_train_from` again with a smaller batch after running out of memory
        (:class:`~optsched.trainer.auto_batch_size.BatchSizeSearch`), from the checkpoint's batch on a resume."""
        if self.dist.enabled:
            raise ValueError(
                f"auto_find_batch_size=True with {self.dist.world_size} processes: a process that runs out of "
                "memory would leave the others waiting in the gradient all-reduce. Accepted: one process, or "
                "auto_find_batch_size=False with a per_device_train_batch_size that fits (found with one process)."
            )
        start = self.args.per_device_train_batch_size
        if checkpoint is not None:
            saved = ckpt.load_trainer_state(checkpoint, verify=self._checkpoint_verify()).train_batch_size
            start = saved if isinstance(saved, int) and saved > 0 else start
        return BatchSizeSearch(self, start).run(lambda: self._train_from(checkpoint))

    def _train_from(self, checkpoint: Path | None) -> TrainOutput:
        """:meth:`train` once the checkpoint to resume from (or ``None``) is known."""
        args = self.args
        self._check_output_dir()
        loader = self.get_train_dataloader()
        plan = self._plan(len(loader) if has_length(loader) else None)

        saved_optimizer = None
        if checkpoint is not None:  # weights loaded, optimizer.pt read (applied below), on two threads
            saved_optimizer = ckpt.load_weights_and_read_optimizer(self.model, checkpoint, self._checkpoint_verify())
        if self._created_lr_scheduler:  # a later train() call gets a schedule for its own length
            self.lr_scheduler, self._created_lr_scheduler = None, False
        self._ensure_optimizer()
        self.create_scheduler(num_training_steps=plan.max_steps)
        if self.lr_scheduler is None:
            raise ValueError(f"{type(self).__name__}.create_scheduler() left self.lr_scheduler as None.")
        if steps_on_metric(self.lr_scheduler) and strategy_name(args.eval_strategy) == "no":
            raise ValueError(
                f"lr_scheduler_type={args.lr_scheduler_type!r} steps on an evaluation metric, but "
                "eval_strategy='no'; accepted: eval_strategy='steps' or 'epoch' with an eval_dataset."
            )

        self.state = self._initial_state(plan, checkpoint)
        if checkpoint is not None:
            self._load_optimizer_and_scheduler(checkpoint, saved_optimizer)
        if args.activation_checkpointing:  # before DDP: its find_unused_parameters rule reads the model
            self._enable_activation_checkpointing()
        compile_with = torch_compile_settings(args)
        # NEFTune's hook goes on before compiling (transformers' order: the compiled graph has it), and
        # comes off however train() ends
        compiled = compile_with is not None or unwrap_compiled(self.model) is not self.model
        with neftune_noise(self.model, args.neftune_noise_alpha, compiled=compiled):
            model = wrap_model(self.model, self.dist, self.device, self.args)
            if compile_with is not None:  # accelerate's order: torch.compile(DDP(model)); self.model stays as is
                model = compile_model(model, *compile_with)
            self.model_wrapped = model
            for attr in ("model", "optimizer", "lr_scheduler"):
                setattr(self.callback_handler, attr, getattr(self, attr))
            self.callback_handler.train_dataloader = loader
            self._nonfinite = NonFiniteGuard(getattr(args, "max_consecutive_nonfinite", 5))
            self._prepare_step_state()
            self._reset_flos_count()
            self._token_counter = self._new_token_counter()
            self.preempted_by = None
            # handlers only around the loop (main thread only), the previous ones restored after it
            preemption = PreemptionHandler(getattr(args, "save_signals", "SIGTERM,SIGINT"), getattr(args, "save_on_signal", True))
            debug_overflow = (DebugUnderflowOverflow(self.model) if "underflow_overflow" in getattr(args, "debug", ())
                              else contextlib.nullcontext())
            with preemption, debug_overflow:
                self._preemption = preemption
                try:
                    return self._train_loop(model, loader, plan, checkpoint)
                finally:
                    self._finish_saves()  # the last checkpoint on disk, older ones rotated, before returning

    def _evaluation_model(self) -> nn.Module:
        """The module evaluation runs: ``self.model``, or with ``torch_compile`` a compiled wrapper of it (no
        DDP: each process evaluates its share), built once and kept while ``self.model`` is the same."""
        compile_with = torch_compile_settings(self.args)
        if compile_with is None:
            return self.model
        model, compiled = getattr(self, "_compiled_for_evaluation", (None, None))
        if model is not self.model:
            model, compiled = self._compiled_for_evaluation = self.model, compile_model(self.model, *compile_with)
        compiled.training = model.training  # the wrapper's own flag: evaluation restores this mode after
        return compiled

    def _enable_activation_checkpointing(self) -> None:
        """``activation_checkpointing=True``: transformers' call, the model's own
        ``activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)``
        (``every_n_layers`` and ``offload`` taken out of ``activation_checkpointing_kwargs``), else the
        older ``gradient_checkpointing_enable(gradient_checkpointing_kwargs)``.

        Raises:
            ValueError: the model has neither method (not a transformers model), or only the older one
                while ``every_n_layers`` / ``offload`` ask for what it cannot do.
        """
        model = unwrap_model(self.model)
        kwargs = dict(self.args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        name = type(model).__name__
        if callable(getattr(model, "activation_checkpointing_enable", None)):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            if every_n_layers != 1 or offload:
                raise ValueError(
                    f"activation_checkpointing_kwargs={self.args.activation_checkpointing_kwargs!r}: the model "
                    f"({name}) has only gradient_checkpointing_enable(), which takes neither every_n_layers "
                    "nor offload. Accepted: keys for torch.utils.checkpoint.checkpoint (use_reentrant, ...), "
                    "or a transformers 5 model."
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        else:
            raise ValueError(
                f"activation_checkpointing=True, but the model ({name}) has no activation_checkpointing_enable() "
                "(or gradient_checkpointing_enable()) method. Accepted: a transformers model, or a model that "
                "defines one of them; for your own module, wrap its blocks in torch.utils.checkpoint.checkpoint "
                "and leave this False."
            )

    def _new_token_counter(self) -> TokenCounter | None:
        """``include_num_input_tokens_seen``'s counter (None for ``"no"``), reading the model's
        ``main_input_name`` as transformers does (``"input_ids"`` when the model has none)."""
        mode = getattr(self.args, "include_num_input_tokens_seen", "no")
        if mode == "no":
            return None
        return TokenCounter(mode, main_input_name(self.model))

    def _train_loop(self, model: nn.Module, loader: DataLoader, plan: TrainingPlan, checkpoint: Path | None) -> TrainOutput:
        args, state = self.args, self.state
        ga = args.gradient_accumulation_steps
        batches_per_epoch = plan.batches_per_epoch or plan.max_steps * ga
        self._tr_loss = torch.zeros((), device=self.device)  # summed on the device, read back when logging
        self._tr_steps = 0  # the applied steps in _tr_loss: the logged loss is their mean
        self._total_loss_scalar = 0.0
        self._total_loss_steps = 0
        self._globalstep_last_logged = state.global_step
        initial_step = self._initial_step = state.global_step  # auto_find_batch_size reads the steps applied
        self._initial_num_input_tokens_seen = state.num_input_tokens_seen  # this call's tokens per second
        start_time = self._train_start_time = time.time()
        self._grad_norm: torch.Tensor | None = None
        self._last_lr: float | None = None
        if _has_mode_switch(self.optimizer):
            self.optimizer.train()
        model.train()  # once here and after each evaluation, not in every training_step
        model.zero_grad(set_to_none=True)

        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        if args.eval_on_start:  # transformers' sanity check: evaluate, no best-metric or scheduler update
            self.evaluate(ignore_keys=self._ignore_keys_for_eval)  # as the evaluations during training
            model.train()
        start_epoch, skip_updates, positioned = self._start_position(loader, plan)
        if checkpoint is not None:
            logger.info("Resuming at global step %d: epoch %d, %s.", state.global_step, start_epoch,
                        "its data from the beginning (ignore_data_skip)" if args.ignore_data_skip
                        else f"skipping {skip_updates} updates of it")
        rng_pending = checkpoint is not None
        if state.global_step >= plan.max_steps:
            logger.warning("Nothing to train: global_step=%d >= max_steps=%d.", state.global_step, plan.max_steps)
            start_epoch = plan.num_train_epochs

        for epoch in range(start_epoch, plan.num_train_epochs):
            first = epoch == start_epoch
            if first and positioned is not None:
                groups = positioned
            else:
                groups = self._epoch_groups(loader, epoch, skip_updates if first else 0)
            batches_done = skip_updates * ga if first else 0
            self.control = self.callback_handler.on_epoch_begin(args, state, self.control)
            stepped = False
            for group in groups:
                if rng_pending:  # restore after the data is positioned, right before the first forward
                    ckpt.load_rng_state(checkpoint, self.dist, verify=self._checkpoint_verify())
                    rng_pending = False
                stepped = True
                self.control = self.callback_handler.on_step_begin(args, state, self.control)
                if not self._run_group(model, group):
                    break  # stopped inside the accumulation: no step, the epoch ends here (transformers)
                batches_done += len(group)
                state.global_step += 1
                state.epoch = epoch + batches_done / batches_per_epoch
                self.control = self.callback_handler.on_step_end(args, state, self.control)
                self._maybe_log_save_evaluate(model)
                self._maybe_save_on_signal()
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if not stepped:
                logger.warning(
                    "The training data gave no batch in epoch %d; stopping at step %d (an IterableDataset "
                    "shorter than max_steps needs?).", epoch, state.global_step,
                )
                self.control.should_training_stop = True
            self.control = self.callback_handler.on_epoch_end(args, state, self.control)
            self._maybe_log_save_evaluate(model)
            if self.control.should_training_stop:
                break

        loss, steps = self._take_loss_window()
        self._total_loss_scalar += loss
        self._total_loss_steps += steps
        steps_done = state.global_step - initial_step
        runtime = time.time() - start_time
        # The mean over the applied steps: a skipped (NaN / inf) one is left out, not counted as 0.
        train_loss = self._total_loss_scalar / self._total_loss_steps if self._total_loss_steps else (
            float("nan") if steps_done else 0.0
        )
        samples_done = self._train_samples_done(loader, plan, steps_done)
        self.store_flos()
        metrics = {
            **speed_metrics("train", runtime, samples_done, steps_done),
            "total_flos": float(state.total_flos),
            "train_loss": train_loss,
        }
        self._memory_tracker.stop("train", metrics)  # skip_memory_metrics=False: logged with the others
        self.log(metrics)
        self._end_with_best_model()  # load_best_model_at_end, save_total_limit=1 (transformers' order)
        self.control = self.callback_handler.on_train_end(args, state, self.control)
        return TrainOutput(state.global_step, train_loss, metrics)

    def _train_samples_done(self, loader: DataLoader, plan: TrainingPlan, steps_done: int) -> float:
        """The samples behind ``train_samples_per_second``, counted as transformers' Trainer counts them.

        The run's planned samples times the share of its steps this call ran: with ``max_steps`` (or a
        dataset without length) the samples of one step (``per_device_train_batch_size`` x
        ``gradient_accumulation_steps`` x processes) per step; by epochs, the dataset's length times
        ``num_train_epochs`` (fractional too), so a short last batch counts its own samples, and the
        batches ``dataloader_drop_last`` drops are counted too (transformers' rule, kept for comparable
        throughput figures).
        """
        args = self.args
        dataset = getattr(loader, "dataset", None)
        if args.max_steps > 0 or not has_length(loader) or dataset is None or not has_length(dataset):
            per_step = self._train_batch_size * args.gradient_accumulation_steps * self.dist.world_size
            return float(steps_done * per_step)
        return len(dataset) * args.num_train_epochs * steps_done / max(plan.max_steps, 1)

    def _run_group(self, model: nn.Module, group: list[Any]) -> bool:
        """Forward/backward every micro-batch of one optimizer step, then clip, step and schedule.

        A step whose loss or gradient norm is NaN / inf is skipped, optimizer and scheduler both (see
        :mod:`optsched.trainer.nonfinite`); its loss is left out of the logged average.

        A callback that sets ``should_training_stop`` or ``should_epoch_stop`` in ``on_substep_end`` stops
        the step there, as transformers' loop breaks right after that hook: the optimizer does not step,
        ``global_step`` does not count it (a resume from the last checkpoint reads these batches again),
        and the partial gradients are dropped (transformers leaves them in ``.grad``).

        Returns:
            False when a callback stopped the step inside its accumulation, else True.
        """
        self._current_accumulation = len(group)
        num_items = self._num_items(group)
        step_loss: torch.Tensor | None = None  # stays on the device: read back at logging time only
        # The logging window's sum continued micro-batch by micro-batch, transformers' order of float
        # additions: adding the step's sum instead logs a loss a few ulps off (6e-8 relative at GA 2)
        window = self._tr_loss
        last_index = len(group) - 1
        counter, tokens = self._token_counter, 0
        for i, batch in enumerate(group):
            last = i == last_index
            with no_sync(model, skip_sync=not last):
                loss = self.training_step(model, batch, num_items)
            self.current_flos += float(self.floating_point_ops(batch))
            if counter is not None:
                tokens += counter.count(batch)
            step_loss = loss if step_loss is None else step_loss + loss
            window = window + loss
            if not last:
                control = self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)
                if control.should_training_stop or control.should_epoch_stop:
                    self._zero_grad()
                    self._add_tokens_seen(tokens)
                    return False
        self._add_tokens_seen(tokens)
        self._grad_norm, stepped = self._clip_and_step(step_loss)
        self._last_lr = self._get_learning_rate()  # the lr this step used
        # A skipped step (NaN / inf: the guard, or fp16's GradScaler) adds nothing to the logged loss with
        # logging_nan_inf_filter (the default): it is the mean of the applied steps. (transformers' filter
        # adds the window's running mean instead, which is 0 in a window that starts with the skip: it
        # logs loss=0.0 and pulls train_loss down.) False counts every step's loss, as transformers does.
        if stepped or not getattr(self.args, "logging_nan_inf_filter", True):
            self._tr_loss = window
            self._tr_steps += 1
        if stepped and not self._metric_scheduler:
            self._step_scheduler()
        self._zero_grad()
        return True

    def _add_tokens_seen(self, tokens: int) -> None:
        """Add this process's input tokens of a step to ``state.num_input_tokens_seen``, summed over the
        processes (one collective per step, where transformers gathers at every micro-batch)."""
        if self._token_counter is None:
            return
        if self.dist.enabled:
            tokens = int(all_reduce_sum(torch.tensor(tokens, dtype=torch.int64, device=self.device), self.dist))
        self.state.num_input_tokens_seen += tokens

    def _take_loss_window(self) -> tuple[float, int]:
        """``(loss summed over the applied steps since the last call, averaged over processes, those
        steps)``; starts the next window. Every process applied the same steps (the skip decision is
        taken on the loss summed over them)."""
        value = all_reduce_sum(self._tr_loss, self.dist).item() / self.dist.world_size
        steps = self._tr_steps
        self._tr_loss.zero_()
        self._tr_steps = 0
        return value, steps

    def _maybe_log_save_evaluate(self, model: nn.Module) -> None:
        state = self.state
        if self.control.should_log and state.global_step > self._globalstep_last_logged:
            loss, steps = self._take_loss_window()
            # No "loss" when every step of the window was skipped: none was applied (transformers logs
            # 0.0 there); "nonfinite_skipped" says why.
            logs: dict[str, float] = {"loss": loss / steps} if steps else {}
            if self._grad_norm is not None:
                logs["grad_norm"] = float(self._grad_norm)
            logs["learning_rate"] = self._last_lr if self._last_lr is not None else self._get_learning_rate()
            skipped = getattr(getattr(self, "_nonfinite", None), "skipped_total", 0)
            if skipped:
                logs["nonfinite_skipped"] = skipped  # steps skipped so far in this train() call
            self._total_loss_scalar += loss
            self._total_loss_steps += steps
            self._globalstep_last_logged = state.global_step
            self.log(logs, self._train_start_time)
        if self.control.should_evaluate:
            metrics = self.evaluate(ignore_keys=self._ignore_keys_for_eval)
            model.train()  # an overridden evaluate() may leave eval mode; training_step no longer resets it
            self._step_metric_scheduler(metrics)
            is_best = self._update_best_metric(metrics)
            if strategy_name(self.args.save_strategy) == "best":
                self.control.should_save = is_best
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, state, self.control)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append ``logs`` (+ ``epoch``, ``step``) to ``state.log_history`` and run the ``on_log`` callbacks.

        With ``include_num_input_tokens_seen``, ``num_input_tokens_seen`` is added too, and, given the
        ``start_time`` of the ``train()`` call (the training logs), ``train_runtime`` and
        ``train_tokens_per_second`` over the tokens of this call, as transformers' ``log`` does.
        """
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if getattr(self.args, "include_num_input_tokens_seen", "no") != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                tokens = self.state.num_input_tokens_seen - getattr(self, "_initial_num_input_tokens_seen", 0)
                logs.update(speed_metrics("train", time.time() - start_time, num_tokens=tokens))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=logs)

    # ---- callbacks and process info (transformers' names) ----------------------------------------------

    def explain(self) -> Any:
        """:func:`optsched.explain` of this Trainer's optimizer, scheduler and model.

        The optimizer exists from construction; the scheduler once :meth:`create_scheduler` ran or
        training started (before that the report shows the groups and memory without a curve).
        """
        from optsched.plan import explain

        return explain(self.optimizer, self.lr_scheduler, self.model)

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    def is_local_process_zero(self) -> bool:
        return self.dist.local_rank == 0

    def is_world_process_zero(self) -> bool:
        return self.dist.is_main_process

    @property
    def num_processes(self) -> int:
        return self.dist.world_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, optimizer="
            f"{type(self.optimizer).__name__ if self.optimizer is not None else None}, lr_scheduler="
            f"{type(self.lr_scheduler).__name__ if self.lr_scheduler is not None else None}, device={self.device})"
        )
