"""Which steps to evaluate to draw a schedule of any length: every step of a short run, a bounded
sample of a long one that draws the same chart.

A chart column (or a PNG pixel) shows the lowest and highest lr of the steps it covers. Between two
*critical steps* (a join of pieces, the end of a warmup or decay, a restart of cosine_with_restarts, a
turn of a multi-cycle cosine) every block of :mod:`optsched.schedules.core` is monotone, so the
extremes of any range of steps are at its two ends or at a critical step. :func:`sample_steps` takes
the first and last step of each chart column, the steps around each critical step and a uniform grid
(which draws the smooth parts and the PNG): the chart is the one every step gives, and the cost is
bounded by ``GRID_STEPS + 2 * width + 3 * (critical steps)``, not by the number of steps.

Example:
    >>> from optsched.schedules.catalog import cosine_with_restarts_schedule
    >>> critical_steps(cosine_with_restarts_schedule(10, 1_000_010, num_cycles=2), 1_000_010)
    [10.0, 500010.0]
    >>> len(sample_steps(10**9, width=60)) <= GRID_STEPS + 2 * 60 + 2
    True
    >>> sample_steps(5, width=60)
    range(0, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from optsched._validation import check_int
from optsched.schedules.core import Constant, Decay, InverseSqrt, Join, Ramp, Scale, Shift, Warmup

__all__ = ["FULL_STEPS", "GRID_STEPS", "MAX_SHAPE_POINTS", "critical_steps", "sample_steps"]

FULL_STEPS = 8192
"""Runs of at most this many steps are evaluated at every step (the output is exact by construction)."""

GRID_STEPS = 4096
"""Steps of the uniform grid of a longer run: about five per pixel of the PNG (800 pixels wide)."""

MAX_SHAPE_POINTS = 1024
"""At most this many turns or restarts of one decay are sampled exactly; a decay with more cycles than
that (thousands of restarts) has them thinned evenly, and the grid draws the rest."""


def _shape_points(decay: Decay) -> list[float]:
    """Local steps (fractional) inside a decay where its shape turns (cosine) or restarts."""
    cycles = float(dict(decay.params).get("num_cycles", 0.5 if decay.shape == "cosine" else 1))
    if decay.shape == "cosine":
        count = math.floor(2 * cycles)  # cos(2 pi c p) turns at p = k / (2c)
        per = 2 * cycles
    elif decay.shape == "cosine_with_restarts":
        count = math.ceil(cycles) - 1  # (c p) % 1 restarts at p = k / c
        per = cycles
    else:  # linear, 1-sqrt, polynomial: monotone
        return []
    if count <= 0 or per <= 0:
        return []
    ks: Iterable[int] = range(1, count + 1)
    if count > MAX_SHAPE_POINTS:
        ks = sorted({1 + (i * (count - 1)) // (MAX_SHAPE_POINTS - 1) for i in range(MAX_SHAPE_POINTS)})
    return [k * decay.num_steps / per for k in ks if k / per < 1.0]


def _critical(schedule: Callable[[int], float], start: float, stop: float) -> list[float]:
    """Critical steps of ``schedule`` placed at ``start`` (its local step 0), kept below ``stop``."""
    from optsched.schedules.continuation import Continuation, Lerp  # continuation imports core too

    if isinstance(schedule, (Constant, InverseSqrt)):
        local: list[float] = []
    elif isinstance(schedule, Warmup):
        local = [float(schedule.num_steps)]
    elif isinstance(schedule, Ramp):
        local = [max(1.0, float(schedule.denominator)) - schedule.offset]  # where it reaches 1 and holds
    elif isinstance(schedule, Decay):
        local = [*_shape_points(schedule), float(schedule.num_steps)]
    elif isinstance(schedule, Shift):
        return [x for x in _critical(schedule.schedule, start - schedule.by, stop) if x >= start]
    elif isinstance(schedule, (Scale, Lerp)):
        return _critical(schedule.schedule, start, stop)
    elif isinstance(schedule, Continuation):
        return _critical(schedule.curve, start, stop)
    elif isinstance(schedule, Join):
        out: list[float] = []
        edges = [0, *schedule.boundaries]
        for index, piece in enumerate(schedule.schedules):
            begin = start + edges[index]
            end = min(stop, start + schedule.boundaries[index]) if index < len(schedule.boundaries) else stop
            if begin >= stop:
                break
            out.append(float(begin))
            out.extend(_critical(piece, begin, end))
        return out
    else:  # a function of one's own: only the grid and the key steps are known
        return []
    return [start + x for x in local if start + x < stop]


def critical_steps(schedule: Callable[[int], float], num_steps: int) -> list[float]:
    """The steps in ``[0, num_steps)`` (fractional where a turn falls between steps) between which the
    schedule is monotone: joins, ends of warmups and decays, restarts and turns of the cosine shapes.

    Known for the blocks of :mod:`optsched.schedules.core` (and :mod:`~optsched.schedules.continuation`)
    and any composition of them, so for every built-in schedule. Any other callable gives ``[]``: it is
    drawn from the uniform grid and the key steps only, so a jump of one's own function that falls
    between two grid steps of a long run is drawn at the grid's resolution.

    Returns:
        Sorted, without duplicates; step 0 is left out (it is always sampled).
    """
    check_int("num_steps", num_steps, low=1)
    return sorted({x for x in _critical(schedule, 0.0, float(num_steps)) if 0 < x < num_steps})


def sample_steps(
    num_steps: int, *, width: int | None = None, critical: Sequence[float] = (), grid: int = GRID_STEPS
) -> Sequence[int]:
    """The steps to evaluate to draw ``num_steps`` steps: all of them up to :data:`FULL_STEPS`, else a
    bounded sample that gives the same chart.

    The sample of a longer run is: the first and last step, a uniform grid of ``grid`` steps,
    the first and last step of each of the ``width`` columns of :func:`~optsched.schedules.render.ascii_chart`
    (buckets as it makes them), and for each critical step ``x`` the steps ``floor(x) - 1 .. floor(x) + 1``
    (both sides of a jump between two steps, both candidates of a turn between them). Pass
    :func:`critical_steps` and any step whose exact lr is printed (the key steps) as ``critical``.

    The chart does not depend on ``grid`` (the column edges and critical steps make it exact); the
    PNG's line does, between critical steps: :data:`GRID_STEPS` gives about five points per pixel.

    Returns:
        ``range(num_steps)`` for a short run, else a sorted list of at most
        ``grid + 2 * width + 3 * len(critical) + 2`` distinct steps in ``[0, num_steps)``.
    """
    check_int("num_steps", num_steps, low=1)
    check_int("width", width, low=1, allow_none=True)
    check_int("grid", grid, low=2)
    if num_steps <= FULL_STEPS:
        return range(num_steps)
    last = num_steps - 1
    steps = {0, last}
    steps.update(round(i * last / (grid - 1)) for i in range(grid))
    if width is not None:
        cols = min(width, num_steps)
        for c in range(cols):  # the buckets of render._columns
            lo = c * num_steps // cols
            hi = max(lo + 1, (c + 1) * num_steps // cols)
            steps.update((lo, hi - 1))
    for x in critical:
        base = math.floor(x)
        steps.update(s for s in (base - 1, base, base + 1) if 0 <= s <= last)
    return sorted(steps)
