"""Every HF ``lr_scheduler_type`` (transformers 5.23), built from the blocks in :mod:`.core`.

Each closed-form factory returns a ``step -> multiplier`` function; for steps ``0..T`` its values
equal ``transformers.get_scheduler(...)``'s ``lr_lambda`` bit for bit (each is built from blocks that
keep HF's operation order: :class:`~.core.StepsLeft` for ``linear``, :class:`~.core.PolynomialDecay`
for ``polynomial``), except where HF misbehaves and optsched deliberately does better (each case is
named in the factory's docstring):

* **No rise after the end.** HF's cosine forms keep following the cosine after the last step, so
  stepping the scheduler past ``num_training_steps`` brings the lr back up (``cosine``,
  ``cosine_with_min_lr``; ``cosine_warmup_with_min_lr`` already at step ``T``, since it reaches its
  floor at step ``T - 1``). Here every decay *holds its final value*.
* **Empty decay.** When ``num_warmup_steps >= num_training_steps`` the decay has no steps; HF's
  cosine forms then jump to the full lr at step ``T`` (and oscillate after), and ``polynomial``
  divides by zero. Here an empty decay is already over: the value is its end value.

``min_lr`` / ``lr_end`` with param groups of different learning rates: a schedule is one multiplier
curve shared by all groups (``lr_i = base_lr_i * f(step)``), so an absolute lr given in kwargs is
turned into a ratio of the optimizer's default lr (``optimizer.defaults["lr"]``, i.e.
``args.learning_rate``), exactly as HF does. A group whose lr is the default one ends at exactly
``min_lr``; a group with ``k`` times that lr ends at ``k * min_lr``. This keeps the ratios between
groups (layer-wise lr decay, per-rule lrs) constant during the whole run, and never makes a group
with a small lr *rise* towards an absolute floor above it.
"""

from __future__ import annotations

import warnings
from typing import Any

from optsched._validation import check_bool, check_choice, check_int, check_number
from optsched.schedules.core import (
    WARMUP_FORMS,
    Constant,
    Decay,
    InverseSqrt,
    Join,
    PolynomialDecay,
    Ramp,
    Shift,
    StepsLeft,
    Warmup,
    join,
    warmup_then,
)
from optsched.schedules.registry import METRIC, register_schedule

__all__ = [
    "constant_schedule",
    "constant_with_warmup_schedule",
    "cosine_schedule",
    "cosine_warmup_with_min_lr_schedule",
    "cosine_with_min_lr_schedule",
    "cosine_with_restarts_schedule",
    "inverse_sqrt_schedule",
    "linear_schedule",
    "polynomial_schedule",
    "warmup_stable_decay_schedule",
]

_DECAY_FORMS = ("linear", "cosine", "1-sqrt")  # WSD's decay_type values (HF)


def _decay_steps(num_warmup_steps: int, num_training_steps: int) -> int:
    # A warmup longer than the run leaves an empty decay (see the module docstring).
    return max(0, num_training_steps - num_warmup_steps)


# --- value checks (independent of steps and lr; shared by validate_scheduler_kwargs and factories) ---
def _check_num_cycles(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "num_cycles" in kwargs:
        check_number("num_cycles", kwargs["num_cycles"], low=0.0, low_open=True)
    return kwargs


def _check_polynomial(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "lr_end" in kwargs:
        check_number("lr_end", kwargs["lr_end"], low=0.0)
    if "power" in kwargs:
        # power <= 0 never decays (0 ** 0 == 1) or divides by zero at the end.
        check_number("power", kwargs["power"], low=0.0, low_open=True)
    return kwargs


def _check_inverse_sqrt(kwargs: dict[str, Any]) -> dict[str, Any]:
    check_int("timescale", kwargs.get("timescale"), low=1, allow_none=True)
    return kwargs


def _check_min_lr(kwargs: dict[str, Any]) -> dict[str, Any]:
    _check_num_cycles(kwargs)
    min_lr, min_lr_rate = kwargs.get("min_lr"), kwargs.get("min_lr_rate")
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError(
            f"min_lr={min_lr!r} and min_lr_rate={min_lr_rate!r} are both set; pass only one of them "
            "in lr_scheduler_kwargs (min_lr: an absolute lr; min_lr_rate: a fraction of the lr)."
        )
    if min_lr is None and min_lr_rate is None:
        raise ValueError(
            "One of min_lr or min_lr_rate must be set through `lr_scheduler_kwargs`, "
            "e.g. {'min_lr_rate': 0.1} (a fraction of the lr) or {'min_lr': 1e-6}."
        )
    check_number("min_lr", min_lr, low=0.0, allow_none=True)
    check_number("min_lr_rate", min_lr_rate, low=0.0, high=1.0, allow_none=True)
    check_number("warmup_lr_rate", kwargs.get("warmup_lr_rate"), low=0.0, high=1.0, allow_none=True)
    return kwargs


def _check_wsd(kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("num_decay_steps") is None:
        raise ValueError(
            "warmup_stable_decay requires `num_decay_steps` in lr_scheduler_kwargs "
            "(scheduler_specific_kwargs), e.g. {'num_decay_steps': 100}."
        )
    check_int("num_decay_steps", kwargs["num_decay_steps"], low=0)
    check_int("num_stable_steps", kwargs.get("num_stable_steps"), low=0, allow_none=True)
    check_choice("warmup_type", kwargs.get("warmup_type", "linear"), WARMUP_FORMS, what="warmup type")
    check_choice("decay_type", kwargs.get("decay_type", "cosine"), _DECAY_FORMS, what="decay type")
    check_number("min_lr_ratio", kwargs.get("min_lr_ratio", 0.0), low=0.0, high=1.0)
    return _check_num_cycles(kwargs)


def _check_min_lr_value(field: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_number(f"{field}[{i}]", v, low=0.0)
    else:
        check_number(field, value, low=0.0)


def _check_plateau_common(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "mode" in kwargs:
        check_choice("mode", kwargs["mode"], ("min", "max"), what="mode")
    if "threshold_mode" in kwargs:
        check_choice("threshold_mode", kwargs["threshold_mode"], ("rel", "abs"), what="threshold mode")
    if "factor" in kwargs:
        check_number("factor", kwargs["factor"], low=0.0, high=1.0, low_open=True, high_open=True)
    for key in ("patience", "cooldown"):
        if key in kwargs:
            check_int(key, kwargs[key], low=0)
    for key in ("threshold", "eps"):
        if key in kwargs:
            check_number(key, kwargs[key], low=0.0)
    if "min_lr" in kwargs:
        _check_min_lr_value("min_lr", kwargs["min_lr"])
    return kwargs


def _check_greedy(kwargs: dict[str, Any]) -> dict[str, Any]:
    _check_plateau_common(kwargs)
    if "max_lr" in kwargs:
        _check_min_lr_value("max_lr", kwargs["max_lr"])
    for key in ("warmup", "reset_start"):
        if key in kwargs:
            check_int(key, kwargs[key], low=0)
    if "window_size" in kwargs:
        check_int("window_size", kwargs["window_size"], low=1)
    for key in ("verbose", "smooth"):
        if key in kwargs:
            check_bool(key, kwargs[key])
    return kwargs


def _min_lr_rate(min_lr: float | None, min_lr_rate: float | None, reference_lr: float) -> float:
    if min_lr_rate is not None:
        return float(min_lr_rate)
    if min_lr is None or min_lr > reference_lr:
        raise ValueError(
            f"min_lr={min_lr!r} is larger than the learning rate {reference_lr!r}; accepted: a min_lr "
            "in [0, lr] (or min_lr_rate in [0, 1])."
        )
    return min_lr / reference_lr


# --- the closed-form schedules ---------------------------------------------------------------
def linear_schedule(num_warmup_steps: int, num_training_steps: int) -> Join:
    """Linear warmup from 0 to 1 over ``W`` steps, then linear decay to 0 at step ``T``.

    ``f(s) = s / max(1, W)`` for ``s < W``; ``f(s) = max(0, (T - s) / max(1, T - W))`` after.
    ``f(0) = 0`` (1 when ``W = 0``), ``f(W) = 1``, ``f(T - 1) = 1 / (T - W)``, 0 from ``T`` on.
    HF's published example (W=2, T=10, lr 10): 0, 5, 10, 8.75, 7.5, 6.25, 5, 3.75, 2.5, 1.25. The decay
    is :class:`~.core.StepsLeft` (``T - s`` in the integers, one division), HF's values bit for bit.
    """
    return warmup_then(num_warmup_steps, StepsLeft(_decay_steps(num_warmup_steps, num_training_steps)))


def cosine_schedule(num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> Join:
    """Linear warmup, then ``0.5 * (1 + cos(2 pi * num_cycles * p))`` with ``p = (s - W) / (T - W)``.

    ``f(0) = 0``, ``f(W) = 1``, ``f(T) = 0`` (for the default half cosine). Better than HF: ``p`` is
    clamped at 1, so the lr holds its final value after step ``T`` instead of rising again, and an
    empty decay (``W >= T``) is over at step ``T`` (HF jumps back to 1 there).
    """
    params = {"num_cycles": num_cycles}
    decay = Decay(_decay_steps(num_warmup_steps, num_training_steps), "cosine", params=params)
    return warmup_then(num_warmup_steps, decay)


def cosine_with_restarts_schedule(
    num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1
) -> Join:
    """Linear warmup, then ``num_cycles`` half-cosines from 1 to 0, each restarting at 1 (hard restarts).

    ``f(s) = 0.5 * (1 + cos(pi * ((num_cycles * p) % 1)))`` with ``p = (s - W) / (T - W)``, and 0 for
    ``p >= 1``. ``f(0) = 0``, ``f(W) = 1``, ``f(T) = 0``.
    """
    params = {"num_cycles": num_cycles}
    decay = Decay(_decay_steps(num_warmup_steps, num_training_steps), "cosine_with_restarts", params=params)
    return warmup_then(num_warmup_steps, decay)


def polynomial_schedule(
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    power: float = 1.0,
    *,
    reference_lr: float,
) -> Join:
    """Linear warmup, then polynomial decay from the lr to ``lr_end``.

    ``lr(s) = (lr - lr_end) * (1 - p) ** power + lr_end`` with ``p = (s - W) / (T - W)``; as a
    multiplier ``f = lr(s) / lr`` where ``lr`` is ``reference_lr`` (the optimizer's default lr, as in
    HF). ``f(0) = 0``, ``f(W) = 1``, ``f(T) = lr_end / lr``, held after ``T``. Groups with another lr
    end at the same *fraction* ``lr_end / lr`` of their own lr (see the module docstring).

    Better than HF: ``W == T`` does not divide by zero (the empty decay is at ``lr_end``).

    Raises:
        ValueError: ``lr_end >= lr`` (HF: "lr_end must be smaller than initial lr"), ``power <= 0``.
    """
    _check_polynomial({"lr_end": lr_end, "power": power})
    if not reference_lr > lr_end:
        raise ValueError(
            f"lr_end={lr_end!r} must be smaller than the initial lr ({reference_lr!r}, the optimizer's "
            "default lr); pass a smaller lr_end in lr_scheduler_kwargs or a larger learning_rate."
        )
    decay = PolynomialDecay(
        _decay_steps(num_warmup_steps, num_training_steps),
        params={"power": power},
        lr_init=reference_lr,
        lr_end=lr_end,
    )
    return warmup_then(num_warmup_steps, decay)


def constant_schedule(num_warmup_steps: int | None = None, num_training_steps: int | None = None) -> Constant:
    """``f(s) = 1``: the optimizer's lr throughout.

    HF ignores the warmup for ``constant``; so does optsched, with a warning when a warmup was asked
    for (``constant_with_warmup`` is the schedule that warms up).
    """
    if num_warmup_steps:
        warnings.warn(
            f"lr_scheduler_type='constant' ignores num_warmup_steps={num_warmup_steps} (as in HF); "
            "use 'constant_with_warmup' for a warmup.",
            UserWarning,
            stacklevel=4,
        )
    return Constant(1.0)


def constant_with_warmup_schedule(num_warmup_steps: int, num_training_steps: int | None = None) -> Join:
    """Linear warmup ``f(s) = s / max(1, W)``, then 1. ``f(0) = 0``, ``f(W) = 1`` = ``f(T)``."""
    return warmup_then(num_warmup_steps, Constant(1.0))


def inverse_sqrt_schedule(
    num_warmup_steps: int, num_training_steps: int | None = None, timescale: int | None = None
) -> Join:
    """Linear warmup, then ``f(s) = 1 / sqrt((s - W + timescale) / timescale)``.

    ``timescale`` defaults to ``W`` (10 000 when ``W = 0``), as in HF. ``f(W) = 1``; the lr halves at
    ``s = W + 3 * timescale``; it never reaches 0 and needs no total.
    """
    _check_inverse_sqrt({"timescale": timescale})
    if timescale is None:
        timescale = num_warmup_steps or 10_000
    return warmup_then(num_warmup_steps, InverseSqrt(timescale))


def cosine_with_min_lr_schedule(
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    *,
    reference_lr: float,
) -> Join:
    """Linear warmup, then cosine from 1 down to ``r = min_lr_rate`` (or ``min_lr / lr``).

    ``f(s) = max(0, c(p) * (1 - r) + r)`` with ``c`` the cosine of :func:`cosine_schedule`.
    ``f(0) = 0``, ``f(W) = 1``, ``f(T) = r``, held after ``T`` (HF rises again). ``min_lr`` is the
    floor of a group whose lr is the optimizer's default lr; other groups keep their ratio (module
    docstring). Exactly one of ``min_lr`` / ``min_lr_rate`` must be given (as in HF).
    """
    _check_min_lr({"num_cycles": num_cycles, "min_lr": min_lr, "min_lr_rate": min_lr_rate})
    rate = _min_lr_rate(min_lr, min_lr_rate, reference_lr)
    decay_steps = _decay_steps(num_warmup_steps, num_training_steps)
    decay = Decay(decay_steps, "cosine", end=rate, params={"num_cycles": num_cycles})
    return warmup_then(num_warmup_steps, decay)


def cosine_warmup_with_min_lr_schedule(
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
    *,
    reference_lr: float,
) -> Join:
    """HF's ``cosine_warmup_with_min_lr``: a warmup counting the current step as done, then cosine to ``r``.

    Warmup (``s < W``): ``(s + 1) / W`` (so step 0 already trains at ``lr / W`` and step ``W - 1`` at
    the full lr), or with ``warmup_lr_rate = a``: ``a + (1 - a) * s / max(1, W - 1)``.
    Decay: ``c(p) * (1 - r) + r`` with ``p = (s - W + 1) / (T - W)``, so ``f(T - 1) = r``: the floor
    is reached on the last training step. Better than HF: held at ``r`` from then on (HF already
    rises again at step ``T``).
    """
    _check_min_lr(
        {
            "num_cycles": num_cycles,
            "min_lr": min_lr,
            "min_lr_rate": min_lr_rate,
            "warmup_lr_rate": warmup_lr_rate,
        }
    )
    rate = _min_lr_rate(min_lr, min_lr_rate, reference_lr)
    if warmup_lr_rate is None:
        warmup = Ramp(denominator=num_warmup_steps, offset=1.0)
    else:
        warmup = Ramp(denominator=num_warmup_steps - 1, start=float(warmup_lr_rate))
    decay_steps = _decay_steps(num_warmup_steps, num_training_steps)
    decay = Decay(decay_steps, "cosine", end=rate, params={"num_cycles": num_cycles})
    return join([warmup, Shift(decay, 1)], [num_warmup_steps])


def warmup_stable_decay_schedule(
    num_warmup_steps: int,
    num_training_steps: int | None = None,
    num_decay_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> Join:
    """Warmup-stable-decay (WSD): warmup from ``m = min_lr_ratio`` to 1, hold 1, decay to ``m``, hold ``m``.

    Phases: warmup ``W`` steps shaped ``warmup_type`` (``linear``, ``cosine``, ``1-sqrt``) from ``m``;
    stable ``S`` steps at 1, where ``S = num_stable_steps`` or ``T - W - num_decay_steps``; decay
    ``D = num_decay_steps`` steps shaped ``decay_type`` (same names; cosine uses ``num_cycles``) down
    to ``m``; then ``m``. ``f(0) = m`` (1 when ``W = 0``), ``f(W) = 1``, ``f(W + S + D) = m``.

    Both ``num_training_steps`` and ``num_stable_steps`` given: ``num_stable_steps`` wins, with a
    warning (as in HF). Better than HF: ``W + D > T`` (a negative stable phase, which HF silently
    turns into a decay starting part-way) is a ``ValueError``.
    """
    _check_wsd(
        {
            "num_decay_steps": num_decay_steps,
            "num_stable_steps": num_stable_steps,
            "warmup_type": warmup_type,
            "decay_type": decay_type,
            "min_lr_ratio": min_lr_ratio,
            "num_cycles": num_cycles,
        }
    )
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError(
            "warmup_stable_decay requires `num_training_steps` or `num_stable_steps` "
            "(in lr_scheduler_kwargs); please provide one of them."
        )
    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps  # type: ignore[operator]
        if num_stable_steps < 0:
            raise ValueError(
                f"warmup_stable_decay: num_warmup_steps ({num_warmup_steps}) + num_decay_steps "
                f"({num_decay_steps}) exceeds num_training_steps ({num_training_steps}); pass a smaller "
                "num_decay_steps or warmup, or an explicit num_stable_steps."
            )
    elif num_training_steps is not None:
        warnings.warn(
            "Both num_training_steps and num_stable_steps are specified. num_stable_steps will be used "
            f"(warmup_stable_decay runs {num_warmup_steps + num_stable_steps + num_decay_steps} steps, "
            f"num_training_steps is {num_training_steps}).",
            UserWarning,
            stacklevel=4,
        )
    m = float(min_lr_ratio)
    stable_end = num_warmup_steps + num_stable_steps
    return join(
        [
            Warmup(num_warmup_steps, warmup_type, start=m),
            Constant(1.0),
            Decay(num_decay_steps, decay_type, end=m, params={"num_cycles": num_cycles}),
            Constant(m),
        ],
        [num_warmup_steps, stable_end, stable_end + num_decay_steps],
    )


# --- metric-driven schedules (lazy: they need torch) -------------------------------------------
def reduce_lr_on_plateau(
    optimizer: Any,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float | list[float] = 0,
    eps: float = 1e-8,
) -> Any:
    """torch's ``ReduceLROnPlateau`` (HF's ``reduce_lr_on_plateau``): lr * factor when the metric stalls."""
    from optsched.schedules.plateau import PlateauLR

    return PlateauLR(
        optimizer,
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_lr,
        eps=eps,
    )


def greedy(optimizer: Any, **kwargs: Any) -> Any:
    """HF's ``GreedyLR``: lr divided by ``factor`` while the metric improves, multiplied when it stalls."""
    from optsched.schedules.greedy import GreedyLR

    return GreedyLR(optimizer, **kwargs)


_GREEDY_KWARGS = {
    "mode": "min",
    "factor": 0.95,
    "patience": 10,
    "threshold": 1e-6,
    "threshold_mode": "abs",
    "cooldown": 0,
    "warmup": 0,
    "min_lr": 1e-3,
    "max_lr": 1.0,
    "eps": 1e-8,
    "verbose": False,
    "smooth": False,
    "window_size": 50,
    "reset_start": 500,
}


def _register_builtins() -> None:
    register_schedule("linear", linear_schedule, description="linear warmup, linear decay to 0")
    register_schedule(
        "cosine", cosine_schedule, check=_check_num_cycles, description="linear warmup, cosine decay to 0"
    )
    register_schedule(
        "cosine_with_restarts",
        cosine_with_restarts_schedule,
        check=_check_num_cycles,
        aliases=("cosine_with_hard_restarts",),
        description="linear warmup, num_cycles cosine decays with hard restarts",
    )
    register_schedule(
        "polynomial",
        polynomial_schedule,
        check=_check_polynomial,
        aliases=("polynomial_decay",),
        description="linear warmup, polynomial decay to lr_end",
    )
    register_schedule("constant", constant_schedule, description="the optimizer's lr throughout")
    register_schedule(
        "constant_with_warmup", constant_with_warmup_schedule, description="linear warmup, then constant"
    )
    register_schedule(
        "inverse_sqrt",
        inverse_sqrt_schedule,
        check=_check_inverse_sqrt,
        description="linear warmup, then 1/sqrt decay",
    )
    register_schedule(
        "cosine_with_min_lr",
        cosine_with_min_lr_schedule,
        check=_check_min_lr,
        description="linear warmup, cosine decay to min_lr",
    )
    register_schedule(
        "cosine_warmup_with_min_lr",
        cosine_warmup_with_min_lr_schedule,
        check=_check_min_lr,
        description="warmup counting the current step, cosine decay to min_lr at the last step",
    )
    register_schedule(
        "warmup_stable_decay",
        warmup_stable_decay_schedule,
        needs_total=False,
        check=_check_wsd,
        aliases=("wsd",),
        description="warmup, stable, decay (WSD)",
    )
    register_schedule(
        "reduce_lr_on_plateau",
        reduce_lr_on_plateau,
        kind=METRIC,
        check=_check_plateau_common,
        aliases=("reduce_on_plateau", "plateau"),
        description="divide the lr when the eval metric stops improving (torch ReduceLROnPlateau)",
    )
    register_schedule(
        "greedy",
        greedy,
        kind=METRIC,
        kwargs=_GREEDY_KWARGS,
        check=_check_greedy,
        aliases=("greedy_lr",),
        description="raise the lr while the metric improves, lower it when it stalls (GreedyLR)",
    )


_register_builtins()
