"""Pure, closed-form schedule building blocks (optax style).

A *schedule* is any callable ``step -> multiplier``: given the 0-based optimizer step it returns the
factor that multiplies each param group's base learning rate (``lr_i = base_lr_i * f(step)``). The
only state is the step, so a curve can be evaluated offline (plots, plans) and a resumed run
continues exactly.

The blocks here are small frozen dataclasses (picklable, comparable, readable ``repr``):

* :class:`Constant` -- ``f(s) = value``.
* :class:`Warmup` -- a ramp over ``num_steps`` steps, shaped ``linear`` / ``cosine`` / ``1-sqrt``
  (the warmup forms of HF's ``warmup_stable_decay``), from ``start`` up to 1.
* :class:`Ramp` -- a straight line with an explicit offset/denominator, for HF's
  ``cosine_warmup_with_min_lr`` warmup that counts the first step as done.
* :class:`Decay` -- from 1 down to ``end`` over ``num_steps`` steps, shaped by a name in
  :data:`DECAY_SHAPES` (``linear``, ``cosine``, ``cosine_with_restarts``, ``1-sqrt``,
  ``polynomial``); it *holds* ``end`` after its last step instead of rising again.
* :class:`InverseSqrt` -- ``1 / sqrt((s + timescale) / timescale)``.
* Combinators: :func:`join` (pieces at step boundaries, each piece sees its local step),
  :func:`warmup_then`, :class:`Shift` (look ``by`` steps ahead), :class:`Scale`.

Example:
    >>> f = warmup_then(2, Decay(8, "linear"))
    >>> [round(f(s), 4) for s in range(11)]
    [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from optsched._validation import check_choice, check_int, check_number, check_step_count

__all__ = [
    "DECAY_SHAPES",
    "WARMUP_FORMS",
    "Constant",
    "Decay",
    "InverseSqrt",
    "Join",
    "PolynomialDecay",
    "Ramp",
    "Scale",
    "Schedule",
    "Shift",
    "StepsLeft",
    "Warmup",
    "check_step",
    "join",
    "warmup_then",
]


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``schedule(step: int) -> float`` (the lr multiplier at that step)."""

    def __call__(self, step: int) -> float: ...


def check_step(step: Any) -> int:
    """Validate a step index (an ``int`` >= 0)."""
    return check_int("step", step, low=0)


# --- warmup forms: progress p in [0, 1] -> value in [0, 1] (HF's `_get_wsd_scheduler_lambda`) ---
def _warmup_linear(p: float) -> float:
    return p


def _warmup_cosine(p: float) -> float:
    return 0.5 * (1.0 - math.cos(math.pi * p))


def _warmup_1_sqrt(p: float) -> float:
    return 1.0 - math.sqrt(1.0 - p)


WARMUP_FORMS: dict[str, Callable[[float], float]] = {
    "linear": _warmup_linear,
    "cosine": _warmup_cosine,
    "1-sqrt": _warmup_1_sqrt,
}
"""Warmup forms by name: ``p -> value`` rising from 0 at ``p=0`` to 1 at ``p=1``."""


# --- decay shapes: (progress p in [0, 1], params) -> value, 1 at p=0 and 0 at p=1 ---
def _decay_linear(p: float, params: Mapping[str, Any]) -> float:
    return 1.0 - p


def _decay_cosine(p: float, params: Mapping[str, Any]) -> float:
    # Same operation order as HF so the numbers agree to the last bits.
    return 0.5 * (1.0 + math.cos(math.pi * float(params.get("num_cycles", 0.5)) * 2.0 * p))


def _decay_cosine_with_restarts(p: float, params: Mapping[str, Any]) -> float:
    if p >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((float(params.get("num_cycles", 1)) * p) % 1.0)))


def _decay_1_sqrt(p: float, params: Mapping[str, Any]) -> float:
    return 1.0 - math.sqrt(p)


def _decay_polynomial(p: float, params: Mapping[str, Any]) -> float:
    return (1.0 - p) ** float(params.get("power", 1.0))


DECAY_SHAPES: dict[str, Callable[[float, Mapping[str, Any]], float]] = {
    "linear": _decay_linear,
    "cosine": _decay_cosine,
    "cosine_with_restarts": _decay_cosine_with_restarts,
    "1-sqrt": _decay_1_sqrt,
    "polynomial": _decay_polynomial,
}
"""Decay shapes by name: ``(p, params) -> value``; params: ``num_cycles`` (cosine forms), ``power``."""


@dataclass(frozen=True)
class Constant:
    """``f(s) = value`` for every step."""

    value: float = 1.0

    def __post_init__(self) -> None:
        check_number("value", self.value, low=0.0)

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Warmup:
    """Rise from ``start`` to 1 over ``num_steps`` steps.

    Formula: ``p = s / max(1, num_steps)``, ``f(s) = max(0, form(p) * (1 - start) + start)`` with
    ``form`` one of :data:`WARMUP_FORMS`. ``f(0) = start``; the value 1 is reached at
    ``s = num_steps`` (which, used in :func:`warmup_then`, is already the next piece). For
    ``s > num_steps`` the ramp holds 1 rather than overshooting.
    """

    num_steps: int
    form: str = "linear"
    start: float = 0.0

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, low=0)
        check_choice("form", self.form, WARMUP_FORMS, what="warmup form")
        check_number("start", self.start, low=0.0, high=1.0)

    def __call__(self, step: int) -> float:
        progress = min(1.0, float(step) / float(max(1, self.num_steps)))
        factor = WARMUP_FORMS[self.form](progress)
        return max(0.0, factor * (1.0 - self.start) + self.start)


@dataclass(frozen=True)
class Ramp:
    """A straight line ``f(s) = start + (1 - start) * (s + offset) / max(1, denominator)``, capped at 1.

    With ``start=0, offset=1, denominator=W`` it is HF's ``cosine_warmup_with_min_lr`` warmup
    (``(s + 1) / W``: the first step already trains at ``lr / W``); with ``offset=0,
    denominator=W - 1`` it reaches 1 on the warmup's last step.
    """

    denominator: float
    start: float = 0.0
    offset: float = 0.0

    def __call__(self, step: int) -> float:
        if self.start == 0.0:
            value = (float(step) + self.offset) / max(1.0, float(self.denominator))
        else:
            value = self.start + (1.0 - self.start) * (float(step) + self.offset) / max(1.0, self.denominator)
        return min(1.0, value)


@dataclass(frozen=True)
class Decay:
    """Fall from 1 to ``end`` over ``num_steps`` steps, then hold ``end``.

    Formula: ``p = min(1, s / max(1, num_steps))`` (``p = 1`` when ``num_steps == 0``: an empty decay
    is already over), ``f(s) = max(0, shape(p) * (1 - end) + end)``. ``f(0) = 1``,
    ``f(num_steps) = end`` and every later step stays at ``end``: unlike HF's cosine, the curve does
    not rise again after the last step.

    Args:
        num_steps: length of the decay in steps (>= 0).
        shape: a name in :data:`DECAY_SHAPES`.
        end: the final multiplier, in ``[0, 1]``.
        params: shape parameters (``num_cycles`` for the cosine forms, ``power`` for polynomial),
            stored as a sorted tuple of pairs so the block stays hashable.
    """

    num_steps: int
    shape: str = "linear"
    end: float = 0.0
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, low=0)
        check_choice("shape", self.shape, DECAY_SHAPES, what="decay shape")
        check_number("end", self.end, low=0.0, high=1.0)
        if isinstance(self.params, Mapping):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))
        elif not isinstance(self.params, (tuple, list)) or not all(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) for pair in self.params
        ):
            raise TypeError(
                f"params must be a dict or a tuple of (name, value) pairs such as (('power', 2.0),), "
                f"got {type(self.params).__name__} {self.params!r}."
            )

    def __call__(self, step: int) -> float:
        if self.num_steps == 0:
            progress = 1.0
        else:
            progress = min(1.0, float(step) / float(max(1, self.num_steps)))
        factor = DECAY_SHAPES[self.shape](progress, dict(self.params))
        return max(0.0, factor * (1.0 - self.end) + self.end)


@dataclass(frozen=True)
class StepsLeft(Decay):
    """HF's linear decay to 0 in HF's own operation order: ``f(s) = max(0, (n - s) / max(1, n))``.

    The values of ``Decay(n, "linear")``, computed as ``1 - s / n`` (the order of HF's
    ``warmup_stable_decay``), which differs from ``(n - s) / n`` in the last bit at some steps
    (``n = 7, s = 1``: ``0.8571428571428572`` against ``0.8571428571428571``). ``n - s`` is exact in the
    integers, so :func:`~optsched.schedules.catalog.linear_schedule` built on this block equals HF's
    ``get_linear_schedule_with_warmup`` bit for bit (and a Trainer logs the same ``learning_rate``). Held
    at 0 from ``s = n`` on; an empty decay (``n = 0``) is 0.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape != "linear" or self.end != 0.0 or self.params:
            raise ValueError(
                f"StepsLeft is the linear decay to 0: shape='linear', end=0 and no params; got "
                f"shape={self.shape!r}, end={self.end!r}, params={self.params!r} (use Decay for others)."
            )

    def __call__(self, step: int) -> float:
        n = self.num_steps
        return max(0.0, float(n - min(step, n)) / float(max(1, n)))


@dataclass(frozen=True)
class PolynomialDecay(Decay):
    """HF's polynomial decay from ``lr_init`` to ``lr_end``, as a multiplier, in HF's operation order.

    Formula: ``f(s) = ((lr_init - lr_end) * (1 - s / n) ** power + lr_end) / lr_init`` for ``s <= n``,
    then ``lr_end / lr_init`` held (``end``, set from the two). ``Decay(n, "polynomial", end=r)``
    computes ``(1 - s / n) ** power * (1 - r) + r``, the same curve to ~1 ulp; this block keeps HF's
    order (the range times the power, plus ``lr_end``, over ``lr_init``), so
    :func:`~optsched.schedules.catalog.polynomial_schedule` equals HF's
    ``get_polynomial_decay_schedule_with_warmup`` bit for bit.

    Args:
        num_steps: length of the decay (>= 0; 0 is an empty decay, at ``lr_end / lr_init``).
        params: ``{"power": p}`` (default 1).
        lr_init: the lr the multiplier is relative to (> ``lr_end``; the optimizer's default lr in HF).
        lr_end: the lr at the end of the decay (>= 0).
    """

    shape: str = "polynomial"
    lr_init: float = 1.0
    lr_end: float = 0.0

    def __post_init__(self) -> None:
        check_number("lr_end", self.lr_end, low=0.0)
        check_number("lr_init", self.lr_init, low=0.0)
        if not self.lr_init > self.lr_end:
            raise ValueError(
                f"lr_end={self.lr_end!r} must be smaller than lr_init={self.lr_init!r}; accepted: "
                "0 <= lr_end < lr_init."
            )
        if self.shape != "polynomial":
            raise ValueError(f"PolynomialDecay has shape='polynomial', got shape={self.shape!r}.")
        object.__setattr__(self, "end", self.lr_end / self.lr_init)
        super().__post_init__()

    def __call__(self, step: int) -> float:
        n = self.num_steps
        if n == 0 or step >= n:  # HF: lr_end / lr_init after the end (and 0 ** power there)
            return self.end
        power = float(dict(self.params).get("power", 1.0))
        remaining = 1 - step / n
        return ((self.lr_init - self.lr_end) * remaining**power + self.lr_end) / self.lr_init


@dataclass(frozen=True)
class InverseSqrt:
    """``f(s) = 1 / sqrt((s + timescale) / timescale)``: 1 at ``s = 0``, halves at ``s = 3 * timescale``."""

    timescale: int

    def __post_init__(self) -> None:
        check_int("timescale", self.timescale, low=1)

    def __call__(self, step: int) -> float:
        return 1.0 / math.sqrt((step + self.timescale) / self.timescale)


@dataclass(frozen=True)
class Shift:
    """``f(s) = schedule(s + by)``: look ``by`` steps ahead (HF's ``+ 1`` in cosine_warmup_with_min_lr)."""

    schedule: Callable[[int], float]
    by: int = 1

    def __call__(self, step: int) -> float:
        return self.schedule(step + self.by)


@dataclass(frozen=True)
class Scale:
    """``f(s) = factor * schedule(s)``."""

    schedule: Callable[[int], float]
    factor: float

    def __call__(self, step: int) -> float:
        return self.factor * self.schedule(step)


@dataclass(frozen=True)
class Join:
    """Pieces joined at step boundaries; see :func:`join`."""

    schedules: tuple[Callable[[int], float], ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(
                f"join needs one more schedule than boundaries; got {len(self.schedules)} schedules "
                f"and {len(self.boundaries)} boundaries."
            )
        for b in self.boundaries:
            check_int("boundary", b, low=0)
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(
                f"boundaries={list(self.boundaries)!r} are not sorted; accepted: ascending steps."
            )

    def __call__(self, step: int) -> float:
        index = bisect.bisect_right(self.boundaries, step)
        start = self.boundaries[index - 1] if index > 0 else 0
        return self.schedules[index](step - start)


def join(schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]) -> Join:
    """Join pieces at step boundaries (optax's ``join_schedules``).

    Piece ``i`` runs from ``boundaries[i-1]`` (or 0) up to ``boundaries[i]`` and is called with its
    *local* step ``s - boundaries[i-1]``. A boundary larger than the run simply never switches.

    Example:
        >>> f = join([Constant(0.5), Constant(1.0)], [3])
        >>> [f(s) for s in range(5)]
        [0.5, 0.5, 0.5, 1.0, 1.0]
    """
    schedules = _check_sequence("schedules", schedules, "a list of schedules (callables step -> multiplier)")
    for i, schedule in enumerate(schedules):
        _check_schedule(f"schedules[{i}]", schedule)
    boundaries = _check_sequence("boundaries", boundaries, "a list of steps such as [10, 100]")
    return Join(tuple(schedules), tuple(check_step_count(f"boundaries[{i}]", b) for i, b in enumerate(boundaries)))


def _check_sequence(field: str, value: Any, accepted: str) -> list[Any]:
    """``value`` as a list: a list or tuple (or another non-string sequence); else a ``TypeError``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be {accepted}, got {type(value).__name__} {value!r}.")
    return list(value)


def _check_schedule(field: str, value: Any) -> None:
    """A schedule is a callable ``step -> multiplier``; anything else is a ``TypeError`` naming it."""
    if not callable(value):
        raise TypeError(
            f"{field} must be a schedule (a callable step -> multiplier such as Constant(1.0) or "
            f"build_schedule('cosine', 10, 100)), got {type(value).__name__} {value!r}."
        )


def warmup_then(
    num_warmup_steps: int, schedule: Callable[[int], float], form: str = "linear", start: float = 0.0
) -> Join:
    """A :class:`Warmup` of ``num_warmup_steps`` steps, then ``schedule`` (called with ``s - W``).

    ``f(0) = start`` (0 by default), ``f(W) = schedule(0)``. With ``W = 0`` it is ``schedule`` itself.
    """
    _check_schedule("schedule", schedule)
    return join([Warmup(num_warmup_steps, form, start), schedule], [num_warmup_steps])
