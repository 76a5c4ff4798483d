"""continue_schedule, Continuation and Lerp: a plan re-planned from a multiplier, as pure functions."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optsched.trainer.resume as resume
from optsched.schedules import Continuation, Lerp, build_schedule, continue_schedule
from optsched.schedules.core import Constant, Decay, InverseSqrt, join, warmup_then


# ---- Lerp ------------------------------------------------------------------------------------------

# (start, end, schedule, expected f(s) for s = 0..4)
LERP_TABLE = [
    (0.5, 0.0, Decay(4, "linear"), [0.5, 0.375, 0.25, 0.125, 0.0]),
    (0.2, 1.0, Decay(4, "linear"), [0.2, 0.4, 0.6, 0.8, 1.0]),  # a rise
    (0.3, 0.3, Decay(4, "cosine"), [0.3] * 5),  # start == end: a constant
    (0.8, 0.1, Decay(2, "cosine"), [0.8, 0.1 + 0.7 * 0.5, 0.1, 0.1, 0.1]),  # holds end after the decay
]


@pytest.mark.parametrize(("start", "end", "schedule", "expected"), LERP_TABLE)
def test_lerp_reference_values(start, end, schedule, expected):
    f = Lerp(schedule, start, end)
    assert [f(s) for s in range(5)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@given(start=st.floats(0, 10), end=st.floats(0, 10), n=st.integers(1, 50))
def test_lerp_edges_are_exact(start, end, n):
    f = Lerp(Decay(n, "cosine"), start, end)
    assert f(0) == start and f(n) == end and f(n + 3) == end  # to the bit, not approx
    assert all(min(start, end) - 1e-12 <= f(s) <= max(start, end) + 1e-12 for s in range(n + 1))


# ---- Continuation ----------------------------------------------------------------------------------


def test_continuation_record_repr_equality_and_pickle():
    planned = warmup_then(2, Decay(8, "linear"))
    g = continue_schedule(planned, 4, 0.5)
    assert isinstance(g, Continuation)
    assert (g.planned, g.from_step, g.multiplier) == (planned, 4, 0.5)
    assert g.record() == {"from_step": 4, "multiplier": 0.5}
    assert "curve" not in repr(g)  # left out: determined by the other fields
    assert g == Continuation(planned, 4, 0.5, Constant(0.0))  # curve not compared
    clone = pickle.loads(pickle.dumps(g))
    assert [clone(s) for s in range(12)] == [g(s) for s in range(12)]
    with pytest.raises(AttributeError):
        g.multiplier = 1.0  # frozen


def test_continuing_a_continuation_starts_from_its_plan():
    planned = warmup_then(2, Decay(8, "linear"))
    once = continue_schedule(planned, 4, 0.5)
    twice = continue_schedule(once, 6, 0.2)
    assert twice.planned is planned
    assert [twice(s) for s in range(12)] == [continue_schedule(planned, 6, 0.2)(s) for s in range(12)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"from_step": -1, "multiplier": 0.5}, ValueError, "from_step"),
        ({"from_step": 1.5, "multiplier": 0.5}, TypeError, "from_step"),
        ({"from_step": 2, "multiplier": -0.1}, ValueError, "multiplier"),
        ({"from_step": 2, "multiplier": "x"}, TypeError, "multiplier"),
        ({"planned": None, "from_step": 2, "multiplier": 0.5}, TypeError, "planned must be a schedule .*got NoneType None"),
        ({"planned": 0.5, "from_step": 2, "multiplier": 0.5}, TypeError, "planned must be a schedule .*got float 0.5"),
    ],
)
def test_continue_schedule_rejects_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        continue_schedule(**{"planned": Decay(10, "linear"), **kwargs})


class _Zero:
    """A piece without an end whose value is 0: it cannot be scaled to a non-zero multiplier."""

    def __call__(self, step: int) -> float:
        return 0.0


def test_continue_cannot_scale_a_zero_piece():
    with pytest.raises(ValueError, match=r"cannot re-plan _Zero from step 5.*accepted: lr_resume_policy='replan'"):
        continue_schedule(join([InverseSqrt(4), _Zero()], [3]), 5, 0.5)


def test_continue_scales_a_piece_without_an_end():
    planned = join([Constant(0.5), InverseSqrt(4)], [5])
    g = continue_schedule(planned, 7, 0.25)
    assert g(7) == 0.25 and g(6) == planned(6)
    assert g(20) == pytest.approx(0.25 * planned(20) / planned(7), rel=1e-12)


def test_old_names_still_importable_from_trainer_resume():
    assert resume.continue_schedule is continue_schedule
    assert resume.Continuation is Continuation and resume.Lerp is Lerp


# ---- the continued schedule, as a pure function ----------------------------------------------------


def _planned(name: str, warmup: int, total: int, **kwargs):
    return build_schedule(name, warmup, total, kwargs, reference_lr=1.0)


# (name, kwargs, W, T, s0, m0, expected g(s) for s = s0, s0 + 1, ...)
CONTINUE_TABLE = [
    ("linear", {}, 2, 10, 4, 0.5, [0.5 * (10 - s) / 6 for s in range(4, 11)] + [0.0]),
    ("cosine", {}, 0, 10, 5, 0.8, [0.8 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 5)) for s in range(5, 10)] + [0.0]),
    ("polynomial", {"lr_end": 0.1, "power": 2.0}, 0, 8, 4, 0.6,
     [0.1 + 0.5 * (1 - (s - 4) / 4) ** 2 for s in range(4, 9)] + [0.1]),
    # warmup not finished: a line from m0 to the peak 1 at W, then the plan (linear 5 -> 20)
    ("linear", {}, 5, 20, 2, 2 / 3, [2 / 3, 7 / 9, 8 / 9, 1.0, 14 / 15]),
    # WSD: stable phase until 6, decay 6 -> 10 to min_lr_ratio 0.1 (linear decay_type)
    ("warmup_stable_decay", {"num_decay_steps": 4, "decay_type": "linear", "min_lr_ratio": 0.1}, 2, 10, 3, 0.9,
     [0.9, 0.9, 0.9, 0.9, 0.1 + 0.8 * 0.75, 0.1 + 0.8 * 0.5, 0.1 + 0.8 * 0.25, 0.1, 0.1]),
    ("constant", {}, 0, 10, 3, 0.25, [0.25] * 5),
    ("constant_with_warmup", {}, 4, 10, 6, 0.3, [0.3] * 5),
    ("cosine_with_min_lr", {"min_lr_rate": 0.2}, 0, 4, 2, 0.5, [0.5, 0.2 + 0.3 * 0.5, 0.2, 0.2]),
]


@pytest.mark.parametrize(("name", "kwargs", "warmup", "total", "s0", "m0", "expected"), CONTINUE_TABLE)
def test_continue_schedule_reference_values(name, kwargs, warmup, total, s0, m0, expected):
    planned = _planned(name, warmup, total, **kwargs)
    g = continue_schedule(planned, s0, m0)
    assert g(s0) == m0  # exactly continuous
    for s in range(s0):
        assert g(s) == planned(s)
    got = [g(s0 + i) for i in range(len(expected))]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_continue_inverse_sqrt_scales_the_plan():
    planned = _planned("inverse_sqrt", 2, 100)
    g = continue_schedule(planned, 10, 0.3)
    for s in (10, 20, 50):
        assert g(s) == pytest.approx(0.3 * planned(s) / planned(10), rel=1e-12)


DECAYING = [("linear", {}), ("cosine", {}), ("polynomial", {"lr_end": 0.05, "power": 1.5}),
            ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_with_restarts", {"num_cycles": 1})]


@settings(max_examples=60, deadline=None)
@given(idx=st.integers(0, len(DECAYING) - 1), warmup=st.integers(0, 20), extra=st.integers(1, 60),
       frac=st.floats(0, 0.999), m0=st.floats(0, 2))
def test_continue_schedule_properties(idx, warmup, extra, frac, m0):
    name, kwargs = DECAYING[idx]
    total = warmup + extra
    s0 = int(frac * total)
    planned = _planned(name, warmup, total, **kwargs)
    g = continue_schedule(planned, s0, m0)
    floor = planned(total)
    assert g(s0) == m0
    assert g(total) == pytest.approx(floor, abs=1e-12) and g(total + 7) == pytest.approx(floor, abs=1e-12)
    start = max(s0, warmup)
    values = [g(s) for s in range(start, total + 1)]
    lo, hi = min(floor, g(start)), max(floor, g(start), 1.0 if s0 < warmup else 0.0)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
    if s0 >= warmup and m0 >= floor:  # a decay from m0 never rises
        assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


