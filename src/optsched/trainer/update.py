"""How the Trainer applies an optimizer's update: backward, clipping, ``optimizer.step()``, scheduler.

Optimizers that update inside ``backward`` (see :func:`optimizer_update_mode`): LOMO / AdaLomo
(``fused_backward``) replace ``loss.backward()`` + ``optimizer.step()`` by ``optimizer.fused_backward(loss,
lr)``, preceded by ``optimizer.grad_norm(loss)`` (a second backward pass) when clipping; layer-wise
optimizers (GaLore / APOLLO ``*_layerwise``) step each parameter from its gradient hook, so there is no
gradient left to clip after ``backward``. Both need ``gradient_accumulation_steps=1``, no fp16 and one
process. A NaN / inf loss skips their backward entirely (nothing is applied); a non-finite gradient is
caught before the update for LOMO with clipping only.

:class:`UpdateMixin` holds the step mechanics of :class:`~optsched.trainer.trainer.Trainer`; the
Trainer's loop calls them through ``self``, so a subclass can still override them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from optsched.trainer.data import scalar_to_device
from optsched.trainer.distributed import all_reduce_sum
from optsched.trainer.evaluation import steps_on_metric
from optsched.trainer.loss_items import count_label_items
from optsched.trainer.nonfinite import grad_total_norm

# the Trainer's logger, as before these methods left trainer.py: users (and tests) filter on its name
logger = logging.getLogger("optsched.trainer.trainer")

__all__ = ["UPDATE_MODES", "UpdateMixin", "optimizer_update_mode"]


def _has_mode_switch(optimizer: Any) -> bool:
    """Schedule-free optimizers expose ``train()`` / ``eval()``; plain torch optimizers do not."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _updates_in_fused_backward(optimizer: Any) -> bool:
    """LOMO / AdaLomo: ``fused_backward(loss, lr)`` updates; ``grad_norm(loss)`` prepares clipping."""
    return all(callable(getattr(optimizer, name, None)) for name in ("fused_backward", "grad_norm"))


def _updates_layerwise(optimizer: Any) -> bool:
    """Each parameter stepped from its gradient hook: optsched's ``LayerWiseOptimizer``, or an optimizer that
    holds its per-parameter optimizers in ``optimizer_dict`` (transformers' ``LayerWiseDummyOptimizer``)."""
    from optsched.optim.lowrank import LayerWiseOptimizer  # torch only; imports no optional package

    per_parameter = getattr(optimizer, "optimizer_dict", None)
    return isinstance(optimizer, LayerWiseOptimizer) or isinstance(per_parameter, dict)


#: How an optimizer applies its update, first match wins; none matching: ``"step"`` (backward, clip,
#: ``optimizer.step()``). Detected from what the optimizer exposes, never from another package's class names.
UPDATE_MODES: dict[str, Callable[[Any], bool]] = {
    "fused_backward": _updates_in_fused_backward,
    "layerwise": _updates_layerwise,
}


def optimizer_update_mode(optimizer: Any) -> str:
    """``"fused_backward"`` (LOMO), ``"layerwise"`` (GaLore / APOLLO layer-wise) or ``"step"`` (the rest).

    The first two update the weights inside ``loss.backward()``; see the module docstring for what the
    Trainer does differently for them.

    Example:
        >>> optimizer_update_mode(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        'step'
    """
    for mode, matches in UPDATE_MODES.items():
        if matches(optimizer):
            return mode
    return "step"


class UpdateMixin:
    """The Trainer's step mechanics: the backward of each update mode, clipping, stepping, zeroing.

    Reads the Trainer's ``args``, ``dist``, ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``,
    ``state``, ``control``, ``callback_handler``, ``compute_loss_func`` and ``device``, and calls its
    ``_get_learning_rate()``; uses ``_nonfinite`` when ``train()`` set it. Owns the per-``train()``
    caches ``_update_mode``, ``_metric_scheduler``, ``_clip_params``, ``_grad_extras``,
    ``_inner_grad_norm`` and ``_logged_no_clip`` (the Trainer's constructor gives them their first
    values).
    """

    def _backward_step(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (through the fp16 ``GradScaler`` when there is one); the step comes later."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _backward_fused(self, loss: torch.Tensor) -> None:
        """LOMO: ``[grad_norm(loss)]`` then ``fused_backward(loss, lr)``, which applies the update.

        The update cannot be undone, so the non-finite checks come before it: a NaN / inf loss skips the
        backward, and so does a non-finite gradient norm from the clipping pass (the step is then counted
        as skipped by :class:`~optsched.trainer.nonfinite.NonFiniteGuard` in :meth:`_clip_and_step`).
        """
        self._inner_grad_norm = None
        if not math.isfinite(float(loss.detach())):
            return
        optimizer = self.optimizer
        clip = getattr(optimizer, "clip_grad_norm", None)
        if clip is not None and clip > 0:
            optimizer.grad_norm(loss)  # backward #1 (graph kept): per-parameter norms, clip coefficient
            norms = getattr(optimizer, "grad_norms", None)
            if isinstance(norms, torch.Tensor) and norms.numel():
                self._inner_grad_norm = torch.linalg.vector_norm(norms.float(), 2.0)
                if not math.isfinite(float(self._inner_grad_norm)):
                    return
        optimizer.fused_backward(loss, self._get_learning_rate())

    def _backward_layerwise(self, loss: torch.Tensor) -> None:
        """Layer-wise: each parameter is stepped from its gradient hook during ``loss.backward()``.

        A NaN / inf loss skips the backward (nothing is applied); gradients are released by the hooks,
        so they can be neither clipped nor checked afterwards.
        """
        if math.isfinite(float(loss.detach())):
            loss.backward()

    def _num_items(self, group: list[Any], across_processes: bool = True) -> torch.Tensor | None:
        """``num_items_in_batch`` of one optimizer step (:mod:`optsched.trainer.loss_items`): the labels
        of all its micro-batches, summed over the processes with ``average_tokens_across_devices`` (unless
        ``across_processes`` is False: an evaluation batch's own count); for ``compute_loss_func``, for label
        smoothing, and for a model whose loss uses it fed dict batches with labels. None otherwise.

        A 0-dim tensor of the default float dtype on the device, as transformers 5.23 passes it (its count
        is divided by the tensor-parallel size): a loss in bfloat16 / float16 (autocast, ``bf16_full_eval``)
        divided by it is divided in float32, as there, where an int64 count keeps the division in bfloat16.
        """
        feeds_model = (
            self.model_accepts_loss_kwargs and isinstance(group[0], Mapping) and "labels" in group[0]
        )
        if self.compute_loss_func is None and self.label_smoother is None and not feeds_model:
            return None
        n = count_label_items(group, shift_labels=self._loss_shifts_labels)  # labels still on the host
        if n is None:
            return None
        total = scalar_to_device(n, self.device)  # queued, not a stall of the host each step on a GPU
        if across_processes and self.args.average_tokens_across_devices:
            total = all_reduce_sum(total, self.dist)  # summed exactly, as integers
        return total.to(torch.get_default_dtype())

    def _clip_and_step(self, step_loss: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """Unscale (fp16), clip to ``max_grad_norm``, step the optimizer unless the step is non-finite.

        Returns:
            ``(pre-clip gradient norm or None, whether the optimizer stepped)``. The norm is the one the
            non-finite check computes when ``max_grad_norm=0`` (logged as ``grad_norm``, as transformers
            does); None only under fp16 without clipping, where no norm is computed. Under fp16 the
            ``GradScaler`` decides (it skips a step with inf / NaN gradients and lowers the scale);
            otherwise :class:`~optsched.trainer.nonfinite.NonFiniteGuard` does, on the step's loss
            (summed over processes) and gradient norm.

        Raises:
            NonFiniteError: more than ``max_consecutive_nonfinite`` non-finite steps in a row.
        """
        if self._update_mode != "step":
            return self._after_update_in_backward(step_loss)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = self._clip_params
        if params is None:  # outside train(): every parameter (clip_grad_norm_ skips those without a grad)
            params = list(self.model.parameters())
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        if self.scaler is None and step_loss is not None and hasattr(self, "_nonfinite"):
            if grad_norm is None:  # not clipped: the guard needs the norm anyway, and it is logged too
                grad_norm = grad_total_norm(params)
            loss = all_reduce_sum(step_loss.detach().clone(), self.dist) if self.dist.enabled else step_loss
            if self._nonfinite.should_skip(float(loss), float(grad_norm), self.state.global_step + 1):
                return grad_norm, False
        self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # a lowered scale means the step was skipped
        else:
            self.optimizer.step()
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
        return grad_norm, stepped

    def _after_update_in_backward(self, step_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """The end of a step whose update happened inside backward (LOMO, layer-wise).

        Nothing to clip or step: LOMO clipped inside its own passes (its gradient norm is returned), the
        layer-wise hooks released every gradient. The non-finite guard still decides whether the step
        counts (a skipped step does not advance the scheduler); the callbacks run as for any step.
        """
        grad_norm = self._inner_grad_norm
        if step_loss is not None and hasattr(self, "_nonfinite"):
            norm = float(grad_norm) if grad_norm is not None else None
            if self._nonfinite.should_skip(float(step_loss), norm, self.state.global_step + 1):
                return grad_norm, False
        self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        if self._update_mode == "layerwise":
            self.optimizer.step()  # a no-op by contract; satisfies torch's scheduler order check, step hooks
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
        return grad_norm, True

    def _step_scheduler(self) -> None:
        """``lr_scheduler.step()``; for LOMO (no ``step()`` to call) without torch's "scheduler before
        optimizer.step()" warning, which would be wrong: the update happened in ``fused_backward``."""
        if self._update_mode != "fused_backward":
            self.lr_scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_scheduler.step()

    def _zero_grad(self) -> None:
        """Release the gradients: the optimizer's, and those of trainable parameters it does not hold.

        ``optimizer.zero_grad`` touches only its own parameters (``model.zero_grad`` walks every module);
        a trainable parameter outside the optimizer (a user's optimizer over part of the model) would
        otherwise accumulate a stale gradient into the next clipping norm.
        """
        self.optimizer.zero_grad(set_to_none=True)
        for p in self._grad_extras:
            p.grad = None

    def _check_update_mode(self) -> None:
        """Refuse what an optimizer that updates inside backward cannot do (see the module docstring).

        Raises:
            ValueError: ``gradient_accumulation_steps > 1``, ``fp16=True`` or several processes together
                with a LOMO or layer-wise optimizer.
        """
        mode = self._update_mode
        if mode == "step":
            return
        what = (
            f"{type(self.optimizer).__name__} updates the weights inside backward ("
            + ("optimizer.fused_backward" if mode == "fused_backward" else "per-parameter gradient hooks")
            + ")"
        )
        ga = self.args.gradient_accumulation_steps
        if ga != 1:
            raise ValueError(
                f"gradient_accumulation_steps={ga!r} is not supported: {what}, so gradients cannot be "
                "accumulated over micro-batches; accepted: 1 (raise per_device_train_batch_size instead)."
            )
        if self.args.fp16:
            raise ValueError(
                f"fp16=True is not supported: {what}, before the GradScaler could unscale the gradients; "
                "accepted: bf16=True or fp16=False."
            )
        if self.dist.enabled:
            raise ValueError(
                f"{self.dist.world_size} processes are not supported: {what}, before DDP averages the "
                "gradients; accepted: a single process."
            )

    def _prepare_step_state(self) -> None:
        """Per-``train()`` caches, so that a step does no work proportional to the number of modules."""
        self._update_mode = optimizer_update_mode(self.optimizer)
        self._check_update_mode()
        self._metric_scheduler = steps_on_metric(self.lr_scheduler)
        self._clip_params = list(self.model.parameters())
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        self._grad_extras = [p for p in self._clip_params if p.requires_grad and id(p) not in held]
        self._inner_grad_norm = None
        if self._update_mode == "layerwise" and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            if not self._logged_no_clip:
                logger.info(
                    "max_grad_norm=%s is not applied: %s steps each parameter from its gradient hook, so no "
                    "gradient is left to clip after backward (set max_grad_norm=0 to silence this).",
                    self.args.max_grad_norm, type(self.optimizer).__name__,
                )
                self._logged_no_clip = True
        if self._update_mode == "fused_backward":
            self._bridge_lomo_clipping()

    def _bridge_lomo_clipping(self) -> None:
        """Apply ``max_grad_norm`` through LOMO's own clipping (its ``clip_grad_norm``) when it has none.

        transformers leaves LOMO unclipped whatever ``max_grad_norm`` says (it clips the already released
        gradients, a no-op). Here ``max_grad_norm > 0`` sets the optimizer's ``clip_grad_norm`` unless it
        was given one, which costs LOMO's second backward pass per step (``grad_norm`` then
        ``fused_backward``); ``max_grad_norm=0`` keeps one pass.
        """
        max_norm = self.args.max_grad_norm
        if getattr(self.optimizer, "clip_grad_norm", 0) is not None:  # absent, or the user's own setting
            return
        if max_norm and max_norm > 0:
            self.optimizer.clip_grad_norm = float(max_norm)
            if not self._logged_no_clip:
                logger.info(
                    "max_grad_norm=%s is applied by %s's own clipping: two backward passes per step "
                    "(grad_norm, then fused_backward); max_grad_norm=0 for one.",
                    max_norm, type(self.optimizer).__name__,
                )
                self._logged_no_clip = True


#: The method that runs the backward of one micro-batch, per update mode (:data:`UPDATE_MODES`), by
#: name: ``training_step`` looks it up on ``self``, so a subclass's override is the one called.
_BACKWARDS: dict[str, str] = {
    "step": "_backward_step",
    "fused_backward": "_backward_fused",
    "layerwise": "_backward_layerwise",
}
