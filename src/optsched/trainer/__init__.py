"""The Trainer: transformers' ``Trainer`` API over optsched's optimizers and schedules.

``Trainer`` (loop, evaluation, checkpoints, resume, DDP), ``TrainerState`` / ``TrainerControl``
(transformers' fields and JSON layout), ``TrainerCallback`` (transformers' hook names), ``ExportableState``
(a callback whose state checkpoints keep).
"""

from __future__ import annotations

from optsched.trainer.callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    JsonLinesLoggerCallback,
    ProgressCallback,
    TrainerCallback,
)
from optsched.trainer.callback_state import ExportableState
from optsched.trainer.checkpoint import get_last_checkpoint
from optsched.trainer.overflow_debug import DebugUnderflowOverflow, UnderflowOverflowError
from optsched.trainer.predictions import EvalPrediction, PredictionOutput
from optsched.trainer.state import TrainerControl, TrainerState
from optsched.trainer.trainer import Trainer, TrainOutput, set_seed

__all__ = [
    "CallbackHandler",
    "DebugUnderflowOverflow",
    "DefaultFlowCallback",
    "EvalPrediction",
    "ExportableState",
    "JsonLinesLoggerCallback",
    "PredictionOutput",
    "ProgressCallback",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "UnderflowOverflowError",
    "get_last_checkpoint",
    "set_seed",
]
