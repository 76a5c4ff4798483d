"""``auto_find_batch_size``: run ``train()`` again with a smaller per-device batch after running out of memory.

transformers' rule (accelerate's ``find_executable_batch_size``): the training loop runs with
``per_device_train_batch_size``; an exception that :func:`is_out_of_memory` recognises (CUDA / HIP / XPU,
MPS, CPU and HPU allocators, cuDNN's "not supported") starts it again with ``int(0.9 * batch)``, until it
runs or the batch reaches 0. The batch found is ``trainer_state.json``'s ``train_batch_size``, and a resume
with ``auto_find_batch_size`` starts from the checkpoint's instead of searching again.
``gradient_accumulation_steps`` is kept, so the batch per optimizer step shrinks with it (transformers'
rule; raise the accumulation yourself for the same effective batch). An out-of-memory error in an
evaluation during training shrinks the training batch too, as in transformers.

Where optsched goes further (:class:`BatchSizeSearch`): each new attempt starts clean. The exception and
its traceback (which hold the failed step's tensors) are dropped and the device cache emptied before the
next attempt; the optimizer (the Trainer's own, built with it, or a given one) drops the per-parameter
state the failed attempt created (its moments), and its groups' settings (lrs, and counters such as
schedule-free's) go back to where they were, where transformers' Trainer goes on with the first attempt's
moments; a given scheduler goes back too (the Trainer's own is made again for the run, as always), and
gradients are cleared. The one thing not undone is weights that optimizer steps already changed (a later,
longer batch ran out of memory): the attempt goes on from them, as in transformers, with a warning naming
the steps (resuming from a checkpoint reloads them). Under DDP it is refused: one process out of memory
would leave the others waiting in the gradient all-reduce.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from optsched.trainer.distributed import empty_device_cache

__all__ = ["OUT_OF_MEMORY_MESSAGES", "BatchSizeSearch", "is_out_of_memory", "next_batch_size"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

OUT_OF_MEMORY_MESSAGES = (
    " out of memory.",  # CUDA, HIP, XPU (torch.OutOfMemoryError's message)
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",  # cuDNN's answer to an input too large for its kernels
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",  # HPU
)
"""accelerate's ``should_reduce_batch_size`` list: a ``RuntimeError`` whose one argument holds one of these."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (accelerate's test: a ``RuntimeError``, which
    ``torch.OutOfMemoryError`` is, with one string argument holding one of :data:`OUT_OF_MEMORY_MESSAGES`)."""
    if not isinstance(exc, RuntimeError) or len(exc.args) != 1 or not isinstance(exc.args[0], str):
        return False
    return any(message in exc.args[0] for message in OUT_OF_MEMORY_MESSAGES)


def next_batch_size(batch_size: int) -> int:
    """``int(0.9 * batch_size)``: 16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0 (accelerate's sequence)."""
    return int(batch_size * 0.9)


class BatchSizeSearch:
    """Runs one training attempt after another on ``trainer`` until one does not run out of memory.

    Args:
        trainer: the Trainer; :meth:`run` sets ``trainer._auto_batch_size`` (its training batch) for each
            attempt and clears it after.
        start: the first batch size to try.
    """

    def __init__(self, trainer: Any, start: int) -> None:
        self.trainer = trainer
        self.start = start
        self.tried: list[int] = []
        optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
        self._optimizer = optimizer  # the Trainer's own (built with it) or a given one
        self._state_before = set(optimizer.state) if optimizer is not None else set()
        # each group's settings (lr, and counters some optimizers keep there: schedule-free's k, ...)
        self._groups_before = (
            [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]
            if optimizer is not None else []
        )
        given_scheduler = scheduler is not None and not getattr(trainer, "_created_lr_scheduler", False)
        self._scheduler_before = copy.deepcopy(scheduler.state_dict()) if given_scheduler else None

    def run(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` with the batch sizes ``start``, ``next_batch_size(start)``, ... until one returns.

        Raises:
            RuntimeError: out of memory with a batch of 1 (the error it raised is the cause).
            Exception: any other error of an attempt, as it is.
        """
        batch_size = self.start
        try:
            while True:
                self.trainer._auto_batch_size = batch_size
                self.tried.append(batch_size)
                failed_at = self._attempt(attempt)
                if not isinstance(failed_at, _OutOfMemory):
                    return failed_at
                smaller = next_batch_size(batch_size)
                if smaller == 0:
                    raise RuntimeError(
                        f"auto_find_batch_size=True: out of memory with every per-device batch size tried "
                        f"({', '.join(map(str, self.tried))}), down to 1. Free memory on the device (a smaller "
                        "model, activation_checkpointing=True, bf16, a lighter optimizer) and train again."
                    ) from failed_at.error
                logger.warning(
                    "auto_find_batch_size: out of memory with per_device_train_batch_size=%d%s; training again "
                    "with %d.%s", batch_size, failed_at.where, smaller, failed_at.carried,
                )
                self._reset_for_next_attempt()
                gc.collect()  # one pass (0.2 s with transformers imported) once the failed attempt is let go
                empty_device_cache(self.trainer.device)
                batch_size = smaller
        finally:
            self.trainer._auto_batch_size = None

    def _attempt(self, attempt: Callable[[], T]) -> T | _OutOfMemory:
        self.trainer._initial_step = None  # set by the training loop when it starts
        try:
            return attempt()
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            step = self.trainer.state.global_step if self.trainer.state is not None else 0
            first = self.trainer._initial_step
            applied = step - first if first is not None else 0
            # the error and its traceback keep the failed step's tensors: only a plain copy leaves this block
            error = RuntimeError(*exc.args)
        return _OutOfMemory(error, step, applied)

    def _reset_for_next_attempt(self) -> None:
        """Everything the failed attempt changed that the next one would otherwise start from (see the
        module docstring), but the weights optimizer steps changed."""
        trainer = self.trainer
        optimizer = trainer.optimizer
        if optimizer is not None and optimizer is self._optimizer:
            for param in [p for p in optimizer.state if p not in self._state_before]:
                del optimizer.state[param]  # as if it had never stepped: the state is made at the first step
            for group, before in zip(optimizer.param_groups, self._groups_before):
                group.update(copy.deepcopy(before))
        elif optimizer is not None:  # made during the failed attempt (a subclass's create_optimizer)
            trainer.optimizer = None
        if self._scheduler_before is not None and trainer.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict(copy.deepcopy(self._scheduler_before))
        for param in trainer.model.parameters():
            param.grad = None
        trainer.scaler = trainer._make_grad_scaler()


class _OutOfMemory:
    """A failed attempt: a plain copy of its error, the step it reached and the steps it applied."""

    def __init__(self, error: RuntimeError, step: int, applied: int) -> None:
        self.error = error
        self.where = f" at step {step + 1}"
        self.carried = (
            f" The model keeps the {applied} optimizer step(s) already applied (resume from a checkpoint, or "
            "set per_device_train_batch_size and start again, for a clean run)." if applied else ""
        )

