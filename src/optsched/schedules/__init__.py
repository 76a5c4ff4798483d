"""Learning-rate schedules: pure closed-form functions, a registry of names, and the torch adapter.

* :mod:`.core` -- building blocks (``Warmup``, ``Decay``, ``StepsLeft``, ``PolynomialDecay``, ``join``,
  ``warmup_then``, ...).
* :mod:`.catalog` -- every HF ``lr_scheduler_type`` built from them.
* :mod:`.registry` -- names, aliases, kwargs validation, ``register_schedule``.
* :mod:`.scheduler` -- ``ScheduleLR``, ``get_scheduler``, ``create_scheduler``.
* :mod:`.continuation` -- ``continue_schedule``: a plan re-planned from a given multiplier (resume).
* :mod:`.plateau`, :mod:`.greedy` -- the metric-driven ones (imported when used).
* :mod:`.render` -- terminal chart and PNG of a curve.
* :mod:`.sampling` -- which steps to evaluate to draw a run of any length (``sample_steps``).
"""

from __future__ import annotations

from optsched.schedules.continuation import Continuation, Lerp, continue_schedule
from optsched.schedules.core import (
    Constant,
    Decay,
    InverseSqrt,
    Join,
    PolynomialDecay,
    Ramp,
    Scale,
    Schedule,
    Shift,
    StepsLeft,
    Warmup,
    join,
    warmup_then,
)
from optsched.schedules.registry import (
    ScheduleInfo,
    SchedulerType,
    get_schedule_info,
    list_schedulers,
    register_schedule,
    resolve_schedule_name,
    validate_scheduler_kwargs,
)
from optsched.schedules.scheduler import (
    ScheduleLR,
    build_schedule,
    create_scheduler,
    get_scheduler,
    is_metric_scheduler,
    make_spec,
)

__all__ = [
    "Constant",
    "Continuation",
    "Decay",
    "InverseSqrt",
    "Join",
    "Lerp",
    "PolynomialDecay",
    "Ramp",
    "Scale",
    "Schedule",
    "ScheduleInfo",
    "ScheduleLR",
    "SchedulerType",
    "Shift",
    "StepsLeft",
    "Warmup",
    "build_schedule",
    "continue_schedule",
    "create_scheduler",
    "get_schedule_info",
    "get_scheduler",
    "is_metric_scheduler",
    "join",
    "list_schedulers",
    "make_spec",
    "register_schedule",
    "resolve_schedule_name",
    "validate_scheduler_kwargs",
    "warmup_then",
]
