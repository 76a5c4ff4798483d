"""Callbacks with transformers' hook names, plus the default flow, progress bar and JSON-lines log.

A callback receives ``(args, state, control, **kwargs)`` (kwargs: ``model``, ``optimizer``,
``lr_scheduler``, ``train_dataloader``, ``eval_dataloader``, and ``logs`` / ``metrics`` for ``on_log`` /
``on_evaluate``) and may return a changed :class:`~optsched.trainer.state.TrainerControl`. A callback
written for ``transformers.TrainerCallback`` works unchanged (transformers' ``EarlyStoppingCallback``,
``DefaultFlowCallback``, ``PrinterCallback`` and ``ProgressCallback`` included) as long as it reads only
``TrainingArguments`` fields that optsched has.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from optsched.trainer.state import TrainerControl, TrainerState

logger = logging.getLogger(__name__)

__all__ = [
    "CALLBACK_EVENTS",
    "CallbackHandler",
    "DefaultFlowCallback",
    "JsonLinesLoggerCallback",
    "LOG_FILE_NAME",
    "ProgressCallback",
    "TrainerCallback",
    "strategy_name",
]

CALLBACK_EVENTS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
)

LOG_FILE_NAME = "log_history.jsonl"


def strategy_name(value: Any) -> str:
    """``"steps"`` for ``"steps"`` or an enum member such as ``IntervalStrategy.STEPS``."""
    return str(getattr(value, "value", value))


class TrainerCallback:
    """Base class: every hook does nothing. Override the ones you need (transformers' names)."""

    def on_init_end(self, args, state, control, **kwargs):
        """After the Trainer's constructor (the optimizer exists)."""

    def on_train_begin(self, args, state, control, **kwargs):
        """At the start of ``train()``, after a resume has restored the state."""

    def on_train_end(self, args, state, control, **kwargs):
        """At the end of ``train()``."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        """At the start of each epoch."""

    def on_epoch_end(self, args, state, control, **kwargs):
        """At the end of each epoch."""

    def on_step_begin(self, args, state, control, **kwargs):
        """Before the first micro-batch of an optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After clipping, before ``optimizer.step()``."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        """After ``optimizer.step()``, before the gradients are zeroed."""

    def on_substep_end(self, args, state, control, **kwargs):
        """After each micro-batch that is not the last of its accumulation. Setting
        ``control.should_training_stop`` (or ``should_epoch_stop``) here stops before the optimizer step,
        whose partial gradients are dropped, as transformers stops."""

    def on_step_end(self, args, state, control, **kwargs):
        """After an optimizer step (``state.global_step`` already counts it)."""

    def on_evaluate(self, args, state, control, **kwargs):
        """After an evaluation (``metrics`` in kwargs)."""

    def on_predict(self, args, state, control, **kwargs):
        """After a prediction run (``metrics`` in kwargs)."""

    def on_save(self, args, state, control, **kwargs):
        """After a checkpoint was written."""

    def on_log(self, args, state, control, **kwargs):
        """After a dict was appended to ``state.log_history`` (``logs`` in kwargs)."""

    def on_prediction_step(self, args, state, control, **kwargs):
        """After each evaluation batch."""


def _reset_step(control: TrainerControl) -> None:
    control._new_step()


# event -> how it resets the control before the callbacks run (transformers' rules)
_CONTROL_RESETS: dict[str, Any] = {
    "on_train_begin": lambda c: c._new_training(),
    "on_epoch_begin": lambda c: c._new_epoch(),
    "on_step_begin": _reset_step,
    "on_evaluate": lambda c: setattr(c, "should_evaluate", False),
    "on_save": lambda c: setattr(c, "should_save", False),
    "on_log": lambda c: setattr(c, "should_log", False),
}


class CallbackHandler:
    """Calls each callback's hook in order; a hook that returns a control replaces the current one."""

    def __init__(self, callbacks: list[Any], model: Any = None, optimizer: Any = None, lr_scheduler: Any = None):
        self.callbacks: list[Any] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = None
        self.eval_dataloader = None

    def add_callback(self, callback: Any) -> None:
        """Add a callback instance, or a class (instantiated with no arguments)."""
        cb = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(cb, e, None)) for e in CALLBACK_EVENTS):
            raise TypeError(
                f"callback {cb!r} has none of the hooks {', '.join(CALLBACK_EVENTS)}; "
                "accepted: a TrainerCallback subclass or instance."
            )
        if type(cb) in {type(c) for c in self.callbacks}:
            logger.warning("Adding a second %s to the Trainer's callbacks.", type(cb).__name__)
        self.callbacks.append(cb)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return the first callback that is ``callback`` (or an instance of that class)."""
        for cb in self.callbacks:
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback: Any) -> None:
        """Remove the first callback that is ``callback`` (or an instance of that class)."""
        self.pop_callback(callback)

    def call_event(self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Reset the control as transformers does for ``event``, then run every callback's hook."""
        reset = _CONTROL_RESETS.get(event)
        if reset is not None:
            reset(control)
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is None:
                continue
            result = hook(
                args,
                state,
                control,
                model=self.model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
        return control

    def __getattr__(self, name: str):
        # handler.on_step_end(args, state, control) == handler.call_event("on_step_end", ...)
        if name in CALLBACK_EVENTS:
            return lambda args, state, control, **kw: self.call_event(name, args, state, control, **kw)
        raise AttributeError(name)


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate, save and stop (transformers' rules).

    Logs every ``logging_steps`` and after step 1 with ``logging_first_step``; evaluates every
    ``eval_steps`` or at each epoch end, never before ``eval_delay`` (a step, or an epoch for
    ``eval_strategy="epoch"``); saves every ``save_steps`` or at each epoch end. The last step of a
    ``"steps"`` run also evaluates (unless before ``eval_delay``) and saves off the interval.
    """

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if strategy_name(args.logging_strategy) == "steps" and state.logging_steps > 0:
            control.should_log = control.should_log or step % state.logging_steps == 0
        eval_steps_due = (
            strategy_name(args.eval_strategy) == "steps"
            and state.eval_steps > 0
            and step % state.eval_steps == 0
            and args.eval_delay <= step
        )
        if eval_steps_due:
            control.should_evaluate = True
        if strategy_name(args.save_strategy) == "steps" and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            # a step-based run ends with an evaluation and a checkpoint even off the interval
            # (only ever set here, as transformers: a request another hook made this step is kept)
            if strategy_name(args.eval_strategy) == "steps" and args.eval_delay <= step:
                control.should_evaluate = True
            if strategy_name(args.save_strategy) == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if strategy_name(args.logging_strategy) == "epoch":
            control.should_log = True
        if strategy_name(args.eval_strategy) == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if strategy_name(args.save_strategy) == "epoch":
            control.should_save = True
        return control


def _format_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps whose postfix shows the last logged loss and learning rate."""

    def __init__(self) -> None:
        self.training_bar = None
        self._shown_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self._shown_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self._shown_step)
            self._shown_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        shown = {k: _format_number(logs[k]) for k in ("loss", "learning_rate", "eval_loss") if k in logs}
        if "learning_rate" in shown:
            shown["lr"] = shown.pop("learning_rate")
        if shown:
            self.training_bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class JsonLinesLoggerCallback(TrainerCallback):
    """Appends every log dict as one JSON line to ``<output_dir>/log_history.jsonl`` (process 0 only).

    Non-finite floats are written as the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` so every line stays
    strict JSON.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None or not getattr(args, "output_dir", None):
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: _json_safe(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, LOG_FILE_NAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
