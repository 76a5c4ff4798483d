"""A schedule continued from a given multiplier: what ``lr_resume_policy="continue"`` re-plans.

When a run resumes under a changed plan, the lr must stay continuous: the new plan ``f`` is re-planned
from the multiplier ``m0`` the run had reached at step ``s0`` (:func:`continue_schedule`). Everything
here is a pure, closed-form function of the step built from the blocks of :mod:`optsched.schedules.core`
(``join``, ``Decay``, ``Constant``, ``Shift``, ``Scale``) plus :class:`Lerp`; it knows nothing of
parameters, optimizers or trainers (the resume logic lives in :mod:`optsched.trainer.resume`).

Example:
    >>> from optsched.schedules.core import Decay, warmup_then
    >>> g = continue_schedule(warmup_then(2, Decay(8, "linear")), 4, 0.5)
    >>> [round(g(s), 4) for s in range(4, 11)]
    [0.5, 0.4167, 0.3333, 0.25, 0.1667, 0.0833, 0.0]
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from optsched._validation import check_int, check_number
from optsched.schedules.core import Constant, Decay, Join, Ramp, Scale, Shift, Warmup, _check_schedule, join

__all__ = ["Continuation", "Lerp", "continue_schedule"]


@dataclass(frozen=True)
class Lerp:
    """Map a ``schedule`` falling from 1 to 0 onto the range from ``start`` to ``end``.

    Formula: ``f(s) = end + (start - end) * schedule(s)``.

    Edges: ``f = start`` exactly (the float ``start`` itself, not a rounded sum) where ``schedule`` is
    1, and ``f = end`` exactly where it is 0, so a join at either end is continuous to the bit.
    ``start`` may be above or below ``end`` (a decay or a rise); ``start == end`` is a constant.

    Args:
        schedule: the shape, a callable ``step -> value`` that is 1 at its start and 0 at its end
            (e.g. ``Decay(n, shape)``).
        start: the value where ``schedule`` is 1.
        end: the value where ``schedule`` is 0.
    """

    schedule: Callable[[int], float]
    start: float
    end: float

    def __call__(self, step: int) -> float:
        v = float(self.schedule(step))
        if v == 1.0:
            return float(self.start)
        if v == 0.0:
            return float(self.end)
        return self.end + (self.start - self.end) * v


@dataclass(frozen=True)
class Continuation:
    """A plan continued from multiplier ``multiplier`` at step ``from_step`` (see :func:`continue_schedule`).

    Formula: ``f(s) = curve(s)``, where ``curve(s) = planned(s)`` for ``s < from_step`` (those steps
    belong to the checkpoint's run, its log has the lrs they used) and ``curve(from_step) = multiplier``
    exactly.

    Attributes:
        planned: the new plan's function (the one that was continued; never itself a ``Continuation``).
        from_step: the step the continuation starts at (``s0``, >= 0).
        multiplier: the multiplier at ``from_step`` (``m0``, >= 0).
        curve: the continued function; left out of ``repr`` and of equality (it is determined by the
            other three).
    """

    planned: Callable[[int], float]
    from_step: int
    multiplier: float
    curve: Callable[[int], float] = field(repr=False, compare=False)

    def __call__(self, step: int) -> float:
        return float(self.curve(step))

    def record(self) -> dict[str, Any]:
        """What the plan file stores to rebuild it: ``{"from_step", "multiplier"}``."""
        return {"from_step": self.from_step, "multiplier": self.multiplier}


def _pieces(schedule: Callable[[int], float]) -> tuple[tuple[Callable[[int], float], ...], tuple[int, ...]]:
    """The pieces and boundaries of a (continued) plan: a :class:`Join`'s own, else one piece, none."""
    if isinstance(schedule, Continuation):
        schedule = schedule.planned
    if isinstance(schedule, Join):
        return schedule.schedules, schedule.boundaries
    return (schedule,), ()


def _find_decay(pieces: Sequence[Any], starts: Sequence[int], s0: int) -> tuple[Decay, int] | None:
    """The plan's decay block and the step where its progress is 0: the first one not over at ``s0``.

    A piece ``Shift(Decay, by)`` starting at step ``start`` has its progress 0 at ``start - by``. When
    every decay is over at ``s0`` the last one is returned; ``None`` when the plan has no decay.
    """
    found = []
    for piece, start in zip(pieces, starts):
        by = 0
        if isinstance(piece, Shift):
            piece, by = piece.schedule, piece.by
        if isinstance(piece, Decay):
            found.append((piece, start - by))
    for decay, begin in found:
        if begin + decay.num_steps > s0:
            return decay, begin
    return found[-1] if found else None


def continue_schedule(planned: Callable[[int], float], from_step: int, multiplier: float) -> Continuation:
    """Re-plan the rest of ``planned`` so it starts at ``multiplier`` at step ``from_step``.

    With ``s0 = from_step``, ``m0 = multiplier`` and ``g`` the result (``g(s0) = m0`` exactly;
    ``g(s) = planned(s)`` for ``s < s0``):

    * warmup not finished (``planned`` is a join whose first piece is a ``Warmup`` / ``Ramp`` ending at
      ``W > s0``): a straight line from ``m0`` at ``s0`` to the peak 1 at ``W``, then ``planned(s)``
      (its stable phase and decay as planned). A cosine or 1-sqrt warmup is re-planned as a line.
    * a decay block ``Decay(n, shape, end=r)`` whose progress is 0 at step ``b`` and that is not over
      at ``s0`` (``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``, the ``*_min_lr`` and
      ``warmup_stable_decay`` schedules): ``g(s) = r + (m0 - r) * shape(p)``, the plan's own shape
      rescaled to start at ``m0``, where ``p`` runs from 0 at ``max(s0, b)`` to 1 at the plan's end
      ``b + n``; before ``b`` (a stable phase not reached yet) ``g`` holds ``m0``. So ``g`` reaches the
      plan's floor ``r`` (0 for linear and cosine, ``lr_end / lr`` for polynomial, ``min_lr_rate``, WSD's
      ``min_lr_ratio``) at the plan's last step and holds it after. ``m0`` below ``r`` rises to ``r``.
    * no decay left (``constant``, ``constant_with_warmup`` after its warmup, a decay already over):
      ``g`` holds ``m0``.
    * any other piece without an end (``inverse_sqrt``): ``g(s) = m0 * planned(s) / planned(s0)``.

    A ``planned`` that is itself a :class:`Continuation` is continued from its ``planned`` function
    (continuing twice does not stack).

    Args:
        planned: the new plan's multiplier function (a ``Join`` of core blocks, as the catalog builds).
        from_step: ``s0``, an ``int`` >= 0.
        multiplier: ``m0``, a number >= 0.

    Returns:
        The :class:`Continuation` ``g``.

    Raises:
        ValueError: ``planned(s0) == 0`` for a piece that can only be scaled; ``from_step < 0``;
            ``multiplier < 0``.
        TypeError: ``from_step`` not an ``int`` or ``multiplier`` not a number.
    """
    _check_schedule("planned", planned)
    s0 = check_int("from_step", from_step, low=0)
    m0 = float(check_number("multiplier", multiplier, low=0.0))
    pieces, bounds = _pieces(planned)
    planned = planned.planned if isinstance(planned, Continuation) else planned
    starts = (0, *bounds)
    warm_end = bounds[0] if bounds and isinstance(pieces[0], (Warmup, Ramp)) else 0
    if s0 < warm_end:
        ramp = Lerp(Decay(warm_end - s0, "linear"), m0, 1.0)
        rest: list[Callable[[int], float]] = [ramp, Shift(planned, warm_end)]
        cuts = [s0, warm_end]
    else:
        found = _find_decay(pieces, starts, s0)
        current = pieces[bisect.bisect_right(bounds, s0)]
        if found is not None and found[1] + found[0].num_steps > s0:
            decay, begin = found
            end_step = begin + decay.num_steps
            first = max(s0, begin)
            tail = Lerp(Decay(end_step - first, decay.shape, 0.0, decay.params), m0, decay.end)
            rest, cuts = ([Constant(m0), tail], [s0, begin]) if begin > s0 else ([tail], [s0])
        elif found is not None or isinstance(current, Constant):
            rest, cuts = [Constant(m0)], [s0]
        else:
            at = float(planned(s0))
            if at <= 0.0:
                raise ValueError(
                    f"lr_resume_policy='continue' cannot re-plan {type(current).__name__} from step {s0}: "
                    "the plan's multiplier there is 0, so it cannot be scaled to the current lr; "
                    "accepted: lr_resume_policy='replan'."
                )
            rest, cuts = [Shift(Scale(planned, m0 / at), s0)], [s0]
    curve = join([planned, *rest], cuts)
    return Continuation(planned, s0, m0, curve)
