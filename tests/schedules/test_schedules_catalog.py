"""The HF schedules: published reference values, registry behaviour, properties, error table."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optsched.schedules import (
    SchedulerType,
    build_schedule,
    get_schedule_info,
    list_schedulers,
    register_schedule,
    resolve_schedule_name,
    validate_scheduler_kwargs,
)
from optsched.schedules.core import Constant, Decay, warmup_then
from optsched.schedules.registry import CLOSED_FORM

LR = 10.0
COMMON = {"num_warmup_steps": 2, "num_training_steps": 10}

# HF's published expectations (transformers tests/optimization/test_optimization.py, lr 10, 10 steps),
# rounded there to 2-3 decimals; the WSD and min-lr rows are hand-derived from the formulas.
REFERENCE = [
    ("constant", {}, {}, [10.0] * 10),
    ("constant_with_warmup", {"num_warmup_steps": 4}, {}, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
    ("linear", COMMON, {}, [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25]),
    ("cosine", COMMON, {}, [0.0, 5.0, 10.0, 9.61, 8.53, 6.91, 5.0, 3.08, 1.46, 0.38]),
    ("cosine_with_restarts", COMMON, {"num_cycles": 2}, [0.0, 5.0, 10.0, 8.53, 5.0, 1.46, 10.0, 8.53, 5.0, 1.46]),
    (
        "polynomial",
        COMMON,
        {"power": 2.0, "lr_end": 1e-7},
        [0.0, 5.0, 10.0, 7.656, 5.625, 3.906, 2.5, 1.406, 0.625, 0.156],
    ),
    ("inverse_sqrt", {"num_warmup_steps": 2}, {}, [0.0, 5.0, 10.0, 8.165, 7.071, 6.325, 5.774, 5.345, 5.0, 4.714]),
    (
        "cosine_with_min_lr",
        COMMON,
        {"min_lr_rate": 0.1},
        [0.0, 5.0, 10.0, 9.657, 8.682, 7.222, 5.5, 3.778, 2.318, 1.343],
    ),
    (
        "cosine_warmup_with_min_lr",
        COMMON,
        {"min_lr": 1.0},
        [5.0, 10.0, 9.657, 8.682, 7.222, 5.5, 3.778, 2.318, 1.343, 1.0],
    ),
    (
        "warmup_stable_decay",
        COMMON,
        {"num_decay_steps": 4, "decay_type": "linear"},
        [0.0, 5.0, 10.0, 10.0, 10.0, 10.0, 10.0, 7.5, 5.0, 2.5],
    ),
]


HAND_DERIVED = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}


@pytest.mark.parametrize(("name", "steps", "kwargs", "expected"), REFERENCE, ids=[r[0] for r in REFERENCE])
def test_reference_values(name, steps, kwargs, expected):
    f = build_schedule(name, steps.get("num_warmup_steps"), steps.get("num_training_steps"), kwargs, reference_lr=LR)
    # HF's published rows are truncated to 2-3 decimals (HF's own tolerance is 1e-2); ours are rounded.
    tol = 1e-3 if name in HAND_DERIVED else 1e-2
    assert [LR * f(s) for s in range(10)] == pytest.approx(expected, abs=tol)


def test_reference_table_covers_every_closed_form():
    assert sorted({r[0] for r in REFERENCE}) == list_schedulers(CLOSED_FORM)


def test_registry_has_every_hf_name():
    assert sorted(t.value for t in SchedulerType) == list_schedulers()


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("linear", "linear"),
        (SchedulerType.COSINE, "cosine"),
        ("COSINE", "cosine"),
        ("Cosine-With-Restarts", "cosine_with_restarts"),
        ("cosine_with_hard_restarts", "cosine_with_restarts"),
        ("REDUCE_ON_PLATEAU", "reduce_lr_on_plateau"),
        ("wsd", "warmup_stable_decay"),
        ("polynomial_decay", "polynomial"),
        (" greedy ", "greedy"),
    ],
)
def test_aliases(alias, canonical):
    assert resolve_schedule_name(alias) == canonical


def test_transformers_enum_members_resolve():
    transformers = pytest.importorskip("transformers")
    for member in transformers.SchedulerType:
        assert resolve_schedule_name(member) == member.value


def test_unknown_name_did_you_mean():
    with pytest.raises(ValueError, match="Did you mean 'cosine'") as info:
        resolve_schedule_name("cosin")
    assert "Accepted: constant" in str(info.value)
    with pytest.raises(TypeError, match="must be a string"):
        resolve_schedule_name(3)


def test_scheduler_type_formats_as_its_value():
    assert f"{SchedulerType.LINEAR}" == "linear" == str(SchedulerType.LINEAR)
    assert SchedulerType("warmup_stable_decay") is SchedulerType.WARMUP_STABLE_DECAY


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("linear", {"num_cycles": 2}, "Accepted for 'linear': none"),
        ("cosine", {"num_cycle": 2}, "Did you mean 'num_cycles'"),
        ("polynomial", {"power": 2, "lr_start": 1.0}, "lr_end, power"),
        ("greedy", {"patiense": 3}, "Did you mean 'patience'"),
        ("reduce_lr_on_plateau", {"verbose": True}, "Accepted for 'reduce_lr_on_plateau'"),
    ],
)
def test_unknown_kwargs_list_accepted_ones(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_scheduler_kwargs(name, kwargs)


def test_validate_returns_a_new_dict():
    kwargs = {"num_cycles": 2}
    out = validate_scheduler_kwargs("cosine_with_restarts", kwargs)
    assert out == kwargs and out is not kwargs
    assert validate_scheduler_kwargs("linear", None) == {}


# Bad input: (name, warmup, total, kwargs, error, message fragment)
ERRORS = [
    ("linear", 2, None, {}, ValueError, "linear requires `num_training_steps`, please provide that argument."),
    ("cosine", None, 10, {}, ValueError, "cosine requires `num_warmup_steps`, please provide that argument."),
    ("constant_with_warmup", None, 10, {}, ValueError, "requires `num_warmup_steps`"),
    ("linear", 2, 0, {}, ValueError, "num_training_steps=0"),
    ("linear", 2, -5, {}, ValueError, "num_training_steps=-5"),
    ("linear", -1, 10, {}, ValueError, "num_warmup_steps=-1"),
    ("linear", 0.1, 10, {}, TypeError, "get_warmup_steps"),
    ("polynomial", 2, 10, {"lr_end": 10.0}, ValueError, "lr_end=10.0 must be smaller than the initial lr"),
    ("polynomial", 2, 10, {"lr_end": 20.0}, ValueError, "lr_end=20.0"),
    ("polynomial", 2, 10, {"power": 0.0}, ValueError, "power=0.0"),
    ("polynomial", 2, 10, {"lr_end": -1.0}, ValueError, "lr_end=-1.0"),
    ("cosine", 2, 10, {"num_cycles": 0}, ValueError, "num_cycles=0"),
    ("cosine_with_restarts", 2, 10, {"num_cycles": -1}, ValueError, "num_cycles=-1"),
    ("cosine", 2, 10, {"num_cycles": "2"}, TypeError, "num_cycles must be a number"),
    ("cosine_with_min_lr", 2, 10, {"min_lr": 1.0, "min_lr_rate": 0.1}, ValueError, "pass only one of them"),
    ("cosine_with_min_lr", 2, 10, {}, ValueError, "One of min_lr or min_lr_rate must be set"),
    ("cosine_warmup_with_min_lr", 2, 10, {"min_lr_rate": 1.5}, ValueError, "min_lr_rate=1.5"),
    ("cosine_with_min_lr", 2, 10, {"min_lr": 50.0}, ValueError, "min_lr=50.0 is larger than the learning rate"),
    ("cosine_warmup_with_min_lr", 2, 10, {"min_lr_rate": 0.1, "warmup_lr_rate": 2}, ValueError, "warmup_lr_rate=2"),
    ("warmup_stable_decay", 2, 10, {}, ValueError, "requires `num_decay_steps`"),
    ("warmup_stable_decay", 2, None, {"num_decay_steps": 3}, ValueError, "`num_training_steps` or `num_stable_steps`"),
    ("warmup_stable_decay", 5, 10, {"num_decay_steps": 8}, ValueError, "exceeds num_training_steps"),
    ("warmup_stable_decay", 2, 10, {"num_decay_steps": 3, "decay_type": "exp"}, ValueError, "decay_type='exp'"),
    ("warmup_stable_decay", 2, 10, {"num_decay_steps": 3, "warmup_type": "cosin"}, ValueError, "Did you mean"),
    ("warmup_stable_decay", 2, 10, {"num_decay_steps": 3, "min_lr_ratio": 1.2}, ValueError, "min_lr_ratio=1.2"),
    ("inverse_sqrt", 2, None, {"timescale": 0}, ValueError, "timescale=0"),
    ("reduce_lr_on_plateau", None, None, {}, ValueError, "metric-driven"),
    ("linear", 2, 10, {"foo": 1}, ValueError, "does not accept"),
]


@pytest.mark.parametrize(("name", "warmup", "total", "kwargs", "error", "match"), ERRORS)
def test_errors(name, warmup, total, kwargs, error, match):
    with pytest.raises(error, match=match.replace("(", r"\(").replace("`", "`")):
        build_schedule(name, warmup, total, kwargs, reference_lr=LR)


def test_warmup_longer_than_total_warns_and_never_peaks():
    with pytest.warns(UserWarning, match="never reaches its peak"):
        f = build_schedule("linear", 20, 10)
    assert max(f(s) for s in range(11)) == pytest.approx(0.5)


def test_constant_ignores_warmup_with_a_warning():
    with pytest.warns(UserWarning, match="constant_with_warmup"):
        f = build_schedule("constant", 5, 10)
    assert f(0) == 1.0


def test_wsd_both_total_and_stable_warns_and_uses_stable():
    with pytest.warns(UserWarning, match="num_stable_steps will be used"):
        f = build_schedule("warmup_stable_decay", 2, 100, {"num_decay_steps": 2, "num_stable_steps": 3})
    assert [f(s) for s in range(8)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_polynomial_end_is_relative_to_reference_lr():
    f = build_schedule("polynomial", 0, 10, {"lr_end": 1e-3}, reference_lr=1e-2)
    assert f(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference_lr"):
        build_schedule("polynomial", 0, 10, {})


def _default_kwargs(name):
    return {
        "cosine_with_min_lr": {"min_lr_rate": 0.1},
        "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
        "warmup_stable_decay": {"num_decay_steps": 3},
    }.get(name, {})


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(list_schedulers(CLOSED_FORM)),
    warmup=st.integers(0, 40),
    extra=st.integers(3, 300),
)
def test_properties_over_the_registry(name, warmup, extra):
    """Finite, within [0, 1] (times the lr), monotone warmup, never NaN or negative, final value held."""
    total = warmup + extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = build_schedule(name, warmup, total, _default_kwargs(name), reference_lr=1.0)
    values = [f(s) for s in range(total + 20)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    warm = values[:warmup]
    assert warm == sorted(warm)
    if name not in ("constant", "constant_with_warmup", "inverse_sqrt"):
        end = values[total]
        assert all(v == pytest.approx(end, abs=1e-12) for v in values[total:])  # no rise after the end
        assert end <= min(values[warmup:total]) + 1e-12
    if name in ("linear", "cosine", "cosine_with_restarts"):
        assert values[total] == 0.0


@settings(max_examples=40, deadline=None)
@given(warmup=st.integers(1, 50), total_extra=st.integers(1, 100), form=st.sampled_from(["linear", "cosine", "1-sqrt"]))
def test_wsd_continuity_at_joins(warmup, total_extra, form):
    decay = max(1, total_extra // 2)
    f = build_schedule(
        "warmup_stable_decay", warmup, warmup + total_extra, {"num_decay_steps": decay, "warmup_type": form, "decay_type": form}
    )
    jumps = [abs(f(s + 1) - f(s)) for s in range(warmup + total_extra)]
    # each step moves at most what the steepest piece allows (1-sqrt is steep at its ends)
    assert max(jumps) <= 1.0 / math.sqrt(min(warmup, decay)) + 1e-9


def test_register_schedule_user_factory():
    def cosine_to_floor(num_warmup_steps, num_training_steps, floor=0.2):
        """cosine to a floor"""
        return warmup_then(num_warmup_steps, Decay(num_training_steps - num_warmup_steps, "cosine", end=floor))

    info = register_schedule("test_cosine_to_floor", cosine_to_floor, aliases=("test_ctf",), overwrite=True)
    assert info.needs_warmup and info.needs_total and dict(info.kwargs) == {"floor": 0.2}
    assert info.description == "cosine to a floor"
    assert "test_cosine_to_floor" in list_schedulers()
    assert get_schedule_info("TEST-CTF").name == "test_cosine_to_floor"
    assert build_schedule("test_ctf", 0, 10, {"floor": 0.5})(10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="Accepted for 'test_cosine_to_floor': floor"):
        validate_scheduler_kwargs("test_ctf", {"flor": 1})
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("test_cosine_to_floor", cosine_to_floor)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("linear", cosine_to_floor)
    with pytest.raises(TypeError, match="callable"):
        register_schedule("test_bad", 3)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_alias_that_is_another_schedules_name_is_refused(overwrite):
    def flat(num_warmup_steps, num_training_steps):
        return Constant(1.0)

    with pytest.raises(ValueError, match="alias 'linear' is the name of the registered schedule 'linear'"):
        register_schedule("test_alias_clash", flat, aliases=("Linear",), overwrite=overwrite)
    assert "test_alias_clash" not in list_schedulers()
    assert get_schedule_info("linear").factory is not flat
