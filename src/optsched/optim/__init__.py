"""Optimizers by name: the registry of :class:`OptimizerSpec`, ``optim_args`` parsing and the factory.

``get_optimizer_cls_and_kwargs(args, model)`` and ``create_optimizer(model, args)`` follow
transformers' ``Trainer`` methods of the same names; ``list_optimizers()`` shows every name (all of
transformers 5.23's, torch's own by lower-case name, and any added with ``register_optimizer``).

Optional packages (bitsandbytes, torchao, schedulefree, galore-torch, apollo-torch, lomo-optim,
grokadamw, torch-optimi) are imported only when a name that needs them is resolved.
"""

from __future__ import annotations

from typing import Any

from optsched.optim.factory import (
    BuildContext,
    create_optimizer,
    fused_supported,
    get_optimizer_cls_and_kwargs,
    is_optimizer_factory,
    resolve_optimizer_name,
)
from optsched.optim.lowrank import LayerWiseOptimizer, check_target_module_exists
from optsched.optim.optim_args import parse_optim_args
from optsched.optim.spec import (
    OMIT,
    OptimArg,
    OptimizerSpec,
    get_optimizer_spec,
    list_optimizers,
    register_optimizer,
    unregister_optimizer,
)

__all__ = [
    "OMIT",
    "Adafactor",
    "AdafactorSchedule",
    "BuildContext",
    "LayerWiseOptimizer",
    "OptimArg",
    "OptimizerSpec",
    "check_target_module_exists",
    "create_optimizer",
    "fused_supported",
    "get_optimizer_cls_and_kwargs",
    "get_optimizer_spec",
    "is_optimizer_factory",
    "list_optimizers",
    "parse_optim_args",
    "register_optimizer",
    "resolve_optimizer_name",
    "unregister_optimizer",
]

_LAZY = {"Adafactor": "optsched.optim.adafactor", "AdafactorSchedule": "optsched.optim.adafactor"}


def __getattr__(name: str) -> Any:
    # Adafactor lives in its own module (written separately); imported on first use.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optsched.optim' has no attribute {name!r}")
