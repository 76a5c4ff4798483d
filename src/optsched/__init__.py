"""optsched: HuggingFace-Trainer-style optimizers, parameter groups and learning-rate schedules.

Public names are re-exported here and imported lazily (PEP 562), so ``import optsched`` is cheap and
never imports an optional package (bitsandbytes, torchao, schedulefree, ...): those are imported only
when an optimizer that needs them is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # arguments
    "TrainingArguments": "optsched.arguments",
    "as_training_arguments": "optsched.arguments",
    # schedules
    "ScheduleLR": "optsched.schedules",
    "get_scheduler": "optsched.schedules",
    "create_scheduler": "optsched.schedules",
    "list_schedulers": "optsched.schedules",
    "register_schedule": "optsched.schedules",
    "SchedulerType": "optsched.schedules",
    "resolve_schedule_name": "optsched.schedules",
    "validate_scheduler_kwargs": "optsched.schedules",
    "build_schedule": "optsched.schedules",
    "is_metric_scheduler": "optsched.schedules",
    "warmup_then": "optsched.schedules",
    "join": "optsched.schedules",
    "Constant": "optsched.schedules",
    "Warmup": "optsched.schedules",
    "Decay": "optsched.schedules",
    "continue_schedule": "optsched.schedules",
    # parameter groups
    "get_decay_parameter_names": "optsched.params",
    "build_param_groups": "optsched.params",
    "classify_parameters": "optsched.params",
    "list_decay_policies": "optsched.params",
    "ParamInfo": "optsched.params",
    "freeze_parameters": "optsched.params",
    "get_layer_ids": "optsched.params",
    "parse_param_rules": "optsched.params",
    # optimizers
    "OptimizerSpec": "optsched.optim",
    "create_optimizer": "optsched.optim",
    "get_optimizer_cls_and_kwargs": "optsched.optim",
    "register_optimizer": "optsched.optim",
    "list_optimizers": "optsched.optim",
    "get_optimizer_spec": "optsched.optim",
    "Adafactor": "optsched.optim",
    "AdafactorSchedule": "optsched.optim",
    "get_adafactor_schedule": "optsched.optim.adafactor",
    "parse_optim_args": "optsched.optim",
    "unregister_optimizer": "optsched.optim",
    # explain / plan / memory
    "explain": "optsched.plan",
    "ExplainReport": "optsched.plan",
    "estimate_optimizer_memory": "optsched.memory",
    "MemoryEstimate": "optsched.memory",
    "measure_optimizer_state": "optsched.memory",
    "register_state_formula": "optsched.memory",
    # trainer
    "Trainer": "optsched.trainer",
    "TrainerState": "optsched.trainer",
    "TrainerCallback": "optsched.trainer",
    "TrainerControl": "optsched.trainer",
    "TrainOutput": "optsched.trainer",
    "EvalPrediction": "optsched.trainer",
    "PredictionOutput": "optsched.trainer",
    "get_last_checkpoint": "optsched.trainer",
    "CheckpointError": "optsched.trainer.checkpoint",
    "NonFiniteError": "optsched.trainer.nonfinite",
    # muon
    "MuonWithAdamW": "optsched.optim.muon",
    "split_muon_groups": "optsched.optim.muon",
    "build_muon": "optsched.optim.muon",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from optsched.arguments import TrainingArguments, as_training_arguments
    from optsched.optim import (
        Adafactor,
        AdafactorSchedule,
        OptimizerSpec,
        create_optimizer,
        get_optimizer_cls_and_kwargs,
        get_optimizer_spec,
        list_optimizers,
        register_optimizer,
    )
    from optsched.params import build_param_groups, get_decay_parameter_names
    from optsched.memory import (
        MemoryEstimate,
        estimate_optimizer_memory,
        measure_optimizer_state,
        register_state_formula,
    )
    from optsched.optim import parse_optim_args, unregister_optimizer
    from optsched.optim.adafactor import get_adafactor_schedule
    from optsched.params import (
        ParamInfo,
        classify_parameters,
        freeze_parameters,
        get_layer_ids,
        list_decay_policies,
        parse_param_rules,
    )
    from optsched.plan import ExplainReport, explain
    from optsched.schedules import Constant, Decay, Warmup, continue_schedule
    from optsched.optim.muon import MuonWithAdamW, build_muon, split_muon_groups
    from optsched.schedules import (
        ScheduleLR,
        SchedulerType,
        build_schedule,
        create_scheduler,
        get_scheduler,
        is_metric_scheduler,
        join,
        list_schedulers,
        register_schedule,
        resolve_schedule_name,
        validate_scheduler_kwargs,
        warmup_then,
    )
    from optsched.trainer.checkpoint import CheckpointError
    from optsched.trainer.nonfinite import NonFiniteError
    from optsched.trainer import (
        EvalPrediction,
        PredictionOutput,
        TrainerCallback,
        TrainerControl,
        Trainer,
        TrainerState,
        TrainOutput,
        get_last_checkpoint,
    )
