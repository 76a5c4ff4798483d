"""TrainerState and TrainerControl: transformers' names, fields and JSON layout.

``trainer_state.json`` written here is readable by ``transformers.TrainerState.load_from_json`` and the
other way round, so a checkpoint directory can move between the two trainers.

One *step* is one optimizer update: with ``gradient_accumulation_steps=n`` a step consumes ``n`` batches
(fewer for the final, partial accumulation of an epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from optsched.trainer.callback_state import ExportableState

logger = logging.getLogger(__name__)

__all__ = ["TrainerControl", "TrainerState"]


@dataclass
class TrainerState:
    """The Trainer's progress, saved with every checkpoint and handed to every callback.

    Attributes:
        epoch: fractional epoch, ``completed epochs + batches consumed this epoch / batches per epoch``.
        global_step: number of optimizer updates done.
        max_steps: number of optimizer updates planned for this ``train()`` call.
        logging_steps / eval_steps / save_steps: absolute intervals (a ratio < 1 in the arguments is
            turned into ``ceil(max_steps * ratio)`` by :meth:`compute_steps`).
        log_history: every logged dict, in order (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``,
            ``step``; evaluation dicts carry ``eval_loss``).
        best_metric / best_global_step / best_model_checkpoint: tracked when ``metric_for_best_model`` is set.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, Any] | None = None
    stateful_callbacks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # transformers writes ``null`` for these when empty
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}

    def save_to_json(self, json_path: str | os.PathLike) -> None:
        """Write the state as sorted, indented JSON (transformers' layout)."""
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load_from_json(cls, json_path: str | os.PathLike) -> TrainerState:
        """Read a state written by :meth:`save_to_json` (or by transformers).

        Keys this class does not know (a newer transformers) are dropped with a warning instead of failing.
        """
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{json_path} does not hold a JSON object; it is not a trainer_state.json.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown keys in %s: %s", json_path, ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def compute_steps(self, args: Any, max_steps: int) -> None:
        """Store absolute logging/eval/save intervals; a value in (0, 1) is a ratio of ``max_steps``."""
        for kind in ("logging", "eval", "save"):
            num_steps = getattr(args, f"{kind}_steps", None)
            if num_steps is None:
                continue
            if 0 < num_steps < 1:
                num_steps = math.ceil(max_steps * num_steps)
            setattr(self, f"{kind}_steps", int(num_steps))


@dataclass
class TrainerControl(ExportableState):
    """Switches the callbacks flip to steer the loop (transformers' names and reset rules).

    ``should_training_stop`` stays set; ``should_epoch_stop`` is reset at each epoch start; ``should_log``,
    ``should_evaluate`` and ``should_save`` at each step start.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict[str, Any]:
        """The exportable form stored under ``stateful_callbacks`` (transformers' shape)."""
        return {"args": dataclasses.asdict(self), "attributes": {}}
