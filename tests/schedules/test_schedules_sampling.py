"""Which steps a long run's chart is drawn from: every step of a short run, a bounded sample of a long
one that draws the chart every step draws."""

from __future__ import annotations

import math

import pytest

from optsched.schedules import build_schedule
from optsched.schedules.core import Constant, join
from optsched.schedules.render import ascii_chart, sample
from optsched.schedules.sampling import (
    FULL_STEPS,
    GRID_STEPS,
    MAX_SHAPE_POINTS,
    critical_steps,
    sample_steps,
)


@pytest.mark.parametrize("num_steps", [1, 2, 97, FULL_STEPS])
def test_a_short_run_is_every_step(num_steps):
    assert sample_steps(num_steps, width=60, critical=[0.5, 3.0]) == range(num_steps)


def test_a_long_run_is_a_bounded_sample_with_the_column_edges_and_the_critical_steps():
    n, width = 10**9, 60
    critical = [123_456_789.5, 5e8, 0.25, n - 0.5]
    steps = sample_steps(n, width=width, critical=critical)
    assert len(steps) <= GRID_STEPS + 2 * width + 3 * len(critical) + 2
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == n - 1
    held = set(steps)
    for c in range(width):  # each column's first and last step (the buckets of ascii_chart)
        assert c * n // width in held and (c + 1) * n // width - 1 in held
    assert {123_456_788, 123_456_789, 123_456_790, 499_999_999, 500_000_000, 500_000_001} <= held


def test_critical_steps_of_the_built_in_schedules():
    restarts = build_schedule("cosine_with_restarts", 10, 1_000_010, {"num_cycles": 2})
    assert critical_steps(restarts, 1_000_010) == [10.0, 500_010.0]
    wsd = build_schedule("warmup_stable_decay", 100, 10_000, {"num_decay_steps": 1000})
    assert critical_steps(wsd, 10_000) == [100.0, 9000.0]  # the end of warmup and the start of decay
    assert critical_steps(wsd, 20_000) == [100.0, 9000.0, 10_000.0]  # and the floor after the run
    cosine = build_schedule("cosine", 0, 1000, {"num_cycles": 1.5})  # turns at 1/3 and 2/3 of the decay
    assert critical_steps(cosine, 1000) == pytest.approx([1000 / 3, 2000 / 3])
    # warmup counting its step as done (a Ramp reaching 1 at W - 1), then the decay shifted by one
    assert critical_steps(build_schedule("cosine_warmup_with_min_lr", 50, 500, {"min_lr_rate": 0.1}, reference_lr=1.0), 500) == [
        49.0, 50.0, 499.0,
    ]
    assert critical_steps(lambda step: 1.0, 100) == []  # a function of one's own: unknown


def test_a_decay_of_many_cycles_has_its_restarts_thinned():
    schedule = build_schedule("cosine_with_restarts", 0, 10**9, {"num_cycles": 100_000})
    points = critical_steps(schedule, 10**9)
    assert MAX_SHAPE_POINTS // 2 < len(points) <= MAX_SHAPE_POINTS
    assert points[0] == pytest.approx(10_000) and points[-1] == pytest.approx(10**9 - 10_000)


SHARP = [
    ("linear", 10, {}),  # the peak at the end of a short warmup
    ("cosine_with_restarts", 57, {"num_cycles": 7}),
    ("warmup_stable_decay", 333, {"num_decay_steps": 5}),  # a decay of five steps at the very end
    ("warmup_stable_decay", 10, {"num_decay_steps": 777, "decay_type": "linear", "min_lr_ratio": 0.1}),
    ("cosine", 17, {"num_cycles": 3.3}),
    ("polynomial", 10, {"power": 3, "lr_end": 1e-9}),
    ("cosine_warmup_with_min_lr", 50, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2}),
    ("inverse_sqrt", 20, {}),
]


@pytest.mark.parametrize(("name", "warmup", "kwargs"), SHARP)
@pytest.mark.parametrize(("width", "height"), [(60, 15), (7, 40), (200, 9)])
def test_the_sampled_chart_is_the_chart_of_every_step(name, warmup, kwargs, width, height):
    n = 20_011
    schedule = build_schedule(name, warmup, n, kwargs, reference_lr=1e-3)
    # a coarse grid: what draws the jumps, turns and corners exactly is the critical steps, at any grid
    steps = sample_steps(n, width=width, critical=critical_steps(schedule, n), grid=16)
    assert len(steps) < 600
    values = [schedule(s) for s in steps]
    assert ascii_chart(values, width, height, steps=steps) == ascii_chart(sample(schedule, n), width, height)


def test_a_one_step_spike_in_a_billion_steps_is_drawn():
    n = 10**9
    at = n // 3 + 12_345  # inside a column, between two steps of the grid
    spike = join([Constant(0.1), Constant(1.0), Constant(0.1)], [at, at + 1])
    steps = sample_steps(n, width=60, critical=critical_steps(spike, n))
    chart = ascii_chart([spike(s) for s in steps], width=60, height=10, steps=steps)
    top = chart.splitlines()[0]
    assert top.startswith("1.000e+00 |") and top.split("|")[1].strip() == "*"  # one column reaches 1
    assert top.index("*") - top.index("|") - 1 == math.floor(at * 60 / n)  # in the column of its step
