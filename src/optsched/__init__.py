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
    # parameter groups
    "get_decay_parameter_names": "optsched.params",
    "build_param_groups": "optsched.params",
    # optimizers
    "OptimizerSpec": "optsched.optim",
    "create_optimizer": "optsched.optim",
    "get_optimizer_cls_and_kwargs": "optsched.optim",
    "register_optimizer": "optsched.optim",
    "list_optimizers": "optsched.optim",
    "get_optimizer_spec": "optsched.optim",
    "Adafactor": "optsched.optim",
    "AdafactorSchedule": "optsched.optim",
    # trainer
    "Trainer": "optsched.trainer",
    "TrainerState": "optsched.trainer",
    "TrainerCallback": "optsched.trainer",
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
    from optsched.schedules import (
        ScheduleLR,
        SchedulerType,
        create_scheduler,
        get_scheduler,
        list_schedulers,
        register_schedule,
    )
    from optsched.trainer import Trainer, TrainerCallback, TrainerState
