"""Building blocks: values at the edges, joins, holding the end value, bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optsched.schedules.core import (
    DECAY_SHAPES,
    WARMUP_FORMS,
    Constant,
    Decay,
    InverseSqrt,
    PolynomialDecay,
    Ramp,
    Scale,
    Shift,
    StepsLeft,
    Warmup,
    join,
    warmup_then,
)


@pytest.mark.parametrize(
    ("form", "mid"),
    [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1.0 - math.sqrt(0.5))],
)
def test_warmup_forms_edges_and_midpoint(form, mid):
    w = Warmup(10, form)
    assert w(0) == 0.0
    assert w(5) == pytest.approx(mid)
    assert w(10) == pytest.approx(1.0)
    assert w(25) == pytest.approx(1.0)  # holds 1 past its end


def test_warmup_start_value():
    assert Warmup(4, "linear", start=0.2)(0) == pytest.approx(0.2)
    assert Warmup(4, "linear", start=0.2)(2) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("shape", "params", "at_half"),
    [
        ("linear", {}, 0.5),
        ("cosine", {}, 0.5),
        ("cosine", {"num_cycles": 1.0}, 0.0),
        ("cosine_with_restarts", {"num_cycles": 2}, 1.0),
        ("1-sqrt", {}, 1.0 - math.sqrt(0.5)),
        ("polynomial", {"power": 2.0}, 0.25),
    ],
)
def test_decay_shapes(shape, params, at_half):
    d = Decay(10, shape, params=params)
    assert d(0) == pytest.approx(1.0)
    assert d(5) == pytest.approx(at_half, abs=1e-12)


@pytest.mark.parametrize("shape", sorted(DECAY_SHAPES))
def test_decay_reaches_end_and_holds(shape):
    d = Decay(8, shape, end=0.1)
    assert d(8) == pytest.approx(0.1)
    assert [d(s) for s in range(8, 40)] == [d(8)] * 32


def test_empty_decay_is_over():
    assert Decay(0, "cosine", end=0.3)(0) == pytest.approx(0.3)


def test_join_uses_local_steps_and_boundaries():
    f = join([Constant(0.5), Decay(4, "linear"), Constant(0.0)], [2, 6])
    assert [f(s) for s in range(8)] == [0.5, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_join_equal_boundaries_skip_empty_piece():
    f = join([Constant(1.0), Constant(2.0), Constant(3.0)], [3, 3])
    assert [f(s) for s in range(5)] == [1.0, 1.0, 1.0, 3.0, 3.0]


def test_warmup_then_zero_warmup_is_the_schedule():
    f = warmup_then(0, Decay(10, "cosine"))
    assert f(0) == 1.0 and f(10) == 0.0


def test_shift_scale_ramp_inverse_sqrt():
    assert Shift(Decay(4, "linear"), 1)(0) == pytest.approx(0.75)
    assert Scale(Constant(1.0), 0.3)(7) == pytest.approx(0.3)
    assert Ramp(denominator=4, offset=1.0)(0) == pytest.approx(0.25)
    assert Ramp(denominator=4, start=0.2)(4) == pytest.approx(1.0)
    assert InverseSqrt(10)(0) == 1.0 and InverseSqrt(10)(30) == pytest.approx(0.5)


def test_blocks_are_hashable_and_comparable():
    assert Decay(5, "cosine", params={"num_cycles": 1.0}) == Decay(5, "cosine", params={"num_cycles": 1.0})
    assert hash(warmup_then(3, Decay(5))) == hash(warmup_then(3, Decay(5)))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Warmup(-1), ValueError, "num_steps=-1"),
        (lambda: Warmup(3, "quadratic"), ValueError, "Did you mean|Accepted"),
        (lambda: Decay(3, "cosin"), ValueError, "Did you mean 'cosine'"),
        (lambda: Decay(3, end=1.5), ValueError, "end=1.5"),
        (lambda: Decay(2.5), TypeError, "num_steps must be an integer"),
        (lambda: InverseSqrt(0), ValueError, "timescale=0"),
        (lambda: join([Constant()], [3]), ValueError, "one more schedule than boundaries"),
        (lambda: join([Constant(), Constant(), Constant()], [5, 2]), ValueError, "not sorted"),
        (lambda: Constant(None), TypeError, "value must be a number, got NoneType None"),
        (lambda: Constant(-1.0), ValueError, r"value=-1.0 is out of range; accepted: a number in \[0.0, inf\)"),
        (lambda: Constant(math.nan), ValueError, "value=nan is not finite"),
        (lambda: Decay(3, params=None), TypeError, r"params must be a dict or a tuple of \(name, value\) pairs.*NoneType"),
        (lambda: warmup_then(2, None), TypeError, "schedule must be a schedule .*got NoneType None"),
        (lambda: warmup_then(2, "cosine"), TypeError, "schedule must be a schedule .*got str 'cosine'"),
        (lambda: join(None, [3]), TypeError, "schedules must be a list of schedules.*got NoneType None"),
        (lambda: join([Constant(), 0.5], [3]), TypeError, r"schedules\[1\] must be a schedule .*got float 0.5"),
        (lambda: join([Constant(), Constant()], None), TypeError, "boundaries must be a list of steps.*got NoneType None"),
        (lambda: join([Constant(), Constant()], 3), TypeError, "boundaries must be a list of steps.*got int 3"),
        (lambda: join([Constant(), Constant()], [2.5]), TypeError, r"boundaries\[0\] must be an integer, got float 2.5"),
        (lambda: join([Constant(), Constant()], ["3"]), TypeError, r"boundaries\[0\] must be an integer, got str '3'"),
    ],
)
def test_bad_blocks(make, error, match):
    with pytest.raises(error, match=match):
        make()


@given(
    warmup=st.integers(0, 50),
    decay=st.integers(0, 200),
    form=st.sampled_from(sorted(WARMUP_FORMS)),
    shape=st.sampled_from(sorted(DECAY_SHAPES)),
    end=st.floats(0.0, 1.0),
)
def test_warmup_then_decay_properties(warmup, decay, form, shape, end):
    f = warmup_then(warmup, Decay(decay, shape, end=end, params={"num_cycles": 0.5, "power": 2.0}), form=form)
    values = [f(s) for s in range(warmup + decay + 5)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 + 1e-12 for v in values)
    assert all(b >= a - 1e-12 for a, b in zip(values[: warmup - 1], values[1:warmup]))  # monotone warmup
    if decay and shape != "cosine_with_restarts":
        # continuity at the join: the last warmup step is one warmup increment below the peak
        assert values[warmup] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(end)  # final value, held


@given(n=st.integers(0, 10_000), at=st.floats(0.0, 1.5))
def test_steps_left_is_the_linear_decay_in_the_integers(n, at):
    """(n - s) / n with n - s exact: the same curve as Decay(n, "linear") (1 - s / n) to an ulp, held at 0."""
    s = int(at * n)
    value = StepsLeft(n)(s)
    assert value == max(0.0, (n - min(s, n)) / max(1, n))
    assert value == pytest.approx(Decay(n, "linear")(s), abs=1e-15)
    assert StepsLeft(n)(n + 3) == 0.0


def test_steps_left_and_decay_linear_differ_in_the_last_bit_where_hf_does():
    # HF's linear schedule computes (T - s) / (T - W); its warmup_stable_decay computes 1 - s / n
    assert StepsLeft(7)(1) == 6 / 7 == 0.8571428571428571
    assert Decay(7, "linear")(1) == 1 - 1 / 7 == 0.8571428571428572


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_decay_runs_from_one_to_lr_end_over_lr_init_and_holds(power):
    d = PolynomialDecay(10, params={"power": power}, lr_init=1e-3, lr_end=1e-5)
    assert d.end == 1e-5 / 1e-3 and d.shape == "polynomial"
    assert d(0) == 1.0
    assert [d(s) for s in range(10, 20)] == [d.end] * 10
    assert d(5) == pytest.approx(Decay(10, "polynomial", end=0.01, params={"power": power})(5), rel=1e-15)
    assert PolynomialDecay(0, lr_init=1.0, lr_end=0.5)(0) == 0.5  # an empty decay is at its end


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": "cosine"}, "shape='cosine'"),
        ({"end": 0.1}, "end=0.1"),
        ({"params": {"power": 2.0}}, "params="),
    ],
)
def test_steps_left_refuses_anything_but_the_linear_decay_to_zero(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepsLeft(5, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_init": 1e-3, "lr_end": 1e-3}, "lr_end=0.001 must be smaller than lr_init=0.001"),
        ({"lr_init": 1e-3, "lr_end": -1.0}, "lr_end"),
        ({"lr_init": 1e-3, "lr_end": 0.0, "shape": "linear"}, "shape='linear'"),
    ],
)
def test_polynomial_decay_refuses_bad_input_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolynomialDecay(5, **kwargs)
