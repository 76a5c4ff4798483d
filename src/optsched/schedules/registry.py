"""The registry of schedule names: one :class:`ScheduleInfo` per name, aliases, kwargs validation.

Built-in entries (every HF ``lr_scheduler_type``) are registered by :mod:`optsched.schedules.catalog`;
users add their own with :func:`register_schedule`. Lookups go through this table, never through an
``if name == ...`` chain.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from optsched._validation import check_choice, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "SchedulerType",
    "ScheduleInfo",
    "get_schedule_info",
    "list_schedulers",
    "register_schedule",
    "resolve_schedule_name",
    "validate_scheduler_kwargs",
]

CLOSED_FORM = "closed_form"
METRIC = "metric"
_KINDS = (CLOSED_FORM, METRIC)

# Parameters a closed-form factory may declare that are supplied by the library, not by the user.
_PROVIDED = ("num_warmup_steps", "num_training_steps", "reference_lr")


class SchedulerType(str, Enum):
    """The HF ``lr_scheduler_type`` names (same values as ``transformers.SchedulerType``)."""

    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"
    REDUCE_ON_PLATEAU = "reduce_lr_on_plateau"
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    COSINE_WARMUP_WITH_MIN_LR = "cosine_warmup_with_min_lr"
    WARMUP_STABLE_DECAY = "warmup_stable_decay"
    GREEDY = "greedy"

    def __str__(self) -> str:  # "linear", not "SchedulerType.LINEAR", in messages and f-strings
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class ScheduleInfo:
    """One registered schedule.

    Attributes:
        name: canonical name.
        kind: ``"closed_form"`` (``factory(num_warmup_steps=..., num_training_steps=..., **kwargs)``
            returns a ``step -> multiplier`` function) or ``"metric"`` (``factory(optimizer, **kwargs)``
            returns a scheduler stepped with a metric).
        factory: see ``kind``.
        kwargs: accepted schedule-specific kwargs and their defaults.
        needs_warmup: ``num_warmup_steps`` must be given (HF: every closed form but ``constant``).
        needs_total: ``num_training_steps`` must be given.
        uses_reference_lr: the factory takes ``reference_lr`` (the optimizer's default lr), used to
            turn absolute lrs such as ``lr_end`` / ``min_lr`` into ratios.
        check: validates kwarg *values* that do not depend on steps or lr; returns the kwargs.
        aliases: other names that resolve to this one.
        description: one line.
    """

    name: str
    kind: str
    factory: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    needs_warmup: bool = True
    needs_total: bool = True
    uses_reference_lr: bool = False
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""


_REGISTRY: dict[str, ScheduleInfo] = {}
_ALIASES: dict[str, str] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _signature_kwargs(factory: Callable[..., Any], kind: str) -> dict[str, Any]:
    """Keyword parameters of ``factory`` (with defaults), minus the ones the library supplies."""
    params = list(inspect.signature(factory).parameters.values())
    if kind == METRIC:
        params = params[1:]  # the optimizer
    out: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _PROVIDED:
            continue
        out[p.name] = None if p.default is p.empty else p.default
    return out


def register_schedule(
    name: str,
    factory: Callable[..., Any],
    *,
    kind: str = CLOSED_FORM,
    kwargs: Mapping[str, Any] | None = None,
    needs_warmup: bool | None = None,
    needs_total: bool | None = None,
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    aliases: Iterable[str] = (),
    description: str = "",
    overwrite: bool = False,
) -> ScheduleInfo:
    """Register a schedule under ``name`` so ``get_scheduler(name, ...)`` and the CLI know it.

    For a closed-form schedule, ``factory(num_warmup_steps, num_training_steps, **kwargs)`` returns a
    ``step -> multiplier`` function (build it from :mod:`optsched.schedules.core`). Whether the warmup
    and total are required, and which kwargs are accepted, are read from the factory's signature
    unless given: a parameter without default is required; ``reference_lr`` is filled in with the
    optimizer's default lr.

    Example:
        >>> from optsched.schedules.core import Decay, warmup_then
        >>> def cosine_to_10pct(num_warmup_steps, num_training_steps, floor=0.1):
        ...     decay = Decay(num_training_steps - num_warmup_steps, "cosine", end=floor)
        ...     return warmup_then(num_warmup_steps, decay)
        >>> info = register_schedule("cosine_to_10pct", cosine_to_10pct, overwrite=True)
        >>> sorted(info.kwargs)
        ['floor']

    Raises:
        ValueError: the name (or an alias) is taken and ``overwrite`` is False, an alias is the name of
            another registered schedule (even with ``overwrite``: it could never resolve), or ``kind``
            is unknown.
        TypeError: ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string, got {type(name).__name__} {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__} {factory!r}.")
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not known; accepted: {', '.join(_KINDS)}.")
    canonical = _normalise(name)
    names = [canonical, *(_normalise(a) for a in aliases)]
    for alias in names[1:]:
        if alias in _REGISTRY and alias != canonical:  # a name always resolves before an alias
            raise ValueError(
                f"alias {alias!r} is the name of the registered schedule {alias!r}, so it would never "
                f"resolve to {canonical!r}; accepted: another alias, or register_schedule({alias!r}, ..., "
                "overwrite=True) to replace that schedule."
            )
    if not overwrite:
        for n in names:
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(
                    f"schedule name {n!r} is already registered; pass overwrite=True to replace it."
                )
    sig = inspect.signature(factory).parameters
    if needs_warmup is None:
        p = sig.get("num_warmup_steps")
        needs_warmup = kind == CLOSED_FORM and p is not None and p.default is p.empty
    if needs_total is None:
        p = sig.get("num_training_steps")
        needs_total = kind == CLOSED_FORM and p is not None and p.default is p.empty
    info = ScheduleInfo(
        name=canonical,
        kind=kind,
        factory=factory,
        kwargs=dict(_signature_kwargs(factory, kind) if kwargs is None else kwargs),
        needs_warmup=needs_warmup,
        needs_total=needs_total,
        uses_reference_lr=kind == CLOSED_FORM and "reference_lr" in sig,
        check=check,
        aliases=tuple(names[1:]),
        description=description or (inspect.getdoc(factory) or "").split("\n")[0],
    )
    _REGISTRY[canonical] = info
    for alias in info.aliases:
        _ALIASES[alias] = canonical
    logger.debug("registered schedule %r (%s)", canonical, kind)
    return info


def list_schedulers(kind: str | None = None) -> list[str]:
    """Canonical names of the registered schedules, sorted; ``kind`` filters closed-form/metric ones."""
    if kind is not None:
        check_choice("kind", kind, _KINDS, what="schedule kind")
    return sorted(n for n, info in _REGISTRY.items() if kind is None or info.kind == kind)


def resolve_schedule_name(name: Any) -> str:
    """Map a name, alias or ``SchedulerType`` member (ours or transformers') to the canonical name.

    Matching ignores case and treats ``-`` and spaces as ``_``; enum members' names work too
    (``"REDUCE_ON_PLATEAU"`` -> ``"reduce_lr_on_plateau"``).

    Raises:
        TypeError: not a string (nor a string enum).
        ValueError: unknown; the message lists the names and the closest matches.
    """
    value = getattr(name, "value", name)
    if not isinstance(value, str):
        raise TypeError(f"lr_scheduler_type must be a string, got {type(name).__name__} {name!r}.")
    key = _normalise(value)
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    choices = list_schedulers()
    raise ValueError(
        f"lr_scheduler_type={value!r} is not a known schedule.{did_you_mean(key, [*choices, *_ALIASES])} "
        f"Accepted: {', '.join(choices)}."
    )


def get_schedule_info(name: Any) -> ScheduleInfo:
    """The :class:`ScheduleInfo` for a name or alias (see :func:`resolve_schedule_name`)."""
    return _REGISTRY[resolve_schedule_name(name)]


def validate_scheduler_kwargs(name: Any, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``kwargs`` for schedule ``name``: only accepted keys, values of the right type and range.

    Values that depend on the optimizer's lr or on the step counts (``lr_end < lr``, the WSD phase
    lengths) are checked when the scheduler is built.

    Returns:
        a new ``dict`` with the same keys (values as checked).

    Raises:
        ValueError: an unknown key (the message lists the accepted ones, with a "did you mean") or a
            bad value.
        TypeError: ``kwargs`` is not a mapping, or a value has the wrong type.
    """
    info = get_schedule_info(name)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"lr_scheduler_kwargs must be a dict, got {type(kwargs).__name__} {kwargs!r}.")
    out = dict(kwargs)
    unknown = [k for k in out if k not in info.kwargs]
    if unknown:
        accepted = ", ".join(sorted(info.kwargs)) or "none"
        hint = did_you_mean(str(unknown[0]), info.kwargs)
        raise ValueError(
            f"lr_scheduler_kwargs has {', '.join(repr(k) for k in unknown)}, which {info.name!r} does not "
            f"accept.{hint} Accepted for {info.name!r}: {accepted}."
        )
    if info.check is not None:
        out = info.check(out)
    return out


# The built-in catalog registers itself into the tables above; imported last on purpose.
from optsched.schedules import catalog as _catalog  # noqa: E402,F401
