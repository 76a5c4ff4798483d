"""Parity with ``transformers.get_scheduler`` over a grid of warmups, totals and kwargs, every closed form.

For steps ``0..T`` our multiplier equals HF's ``lr_lambda`` bit for bit (``==`` on the floats), and so
do the group lrs of the two torch schedulers over a run, except the documented improvements (see
:mod:`optsched.schedules.catalog`), which are asserted explicitly here.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from optsched.schedules import build_schedule, get_scheduler, list_schedulers  # noqa: E402

LR = 3e-4
WARMUPS = (0, 1, 3, 10)
TOTALS = (1, 7, 20, 100)

# name -> list of kwargs dicts (each crossed with every warmup and total)
KWARGS: dict[str, list[dict]] = {
    "linear": [{}],
    "cosine": [{}, {"num_cycles": 0.25}, {"num_cycles": 1.0}, {"num_cycles": 1.7}],
    "cosine_with_restarts": [{}, {"num_cycles": 2}, {"num_cycles": 3}],
    "polynomial": [{}, {"power": 2.0}, {"power": 0.5, "lr_end": 1e-5}, {"lr_end": 0.0, "power": 3.0}],
    "constant": [{}],
    "constant_with_warmup": [{}],
    "inverse_sqrt": [{}, {"timescale": 5}, {"timescale": 50}],
    "cosine_with_min_lr": [
        {"min_lr_rate": 0.1},
        {"min_lr": 1e-5},
        {"min_lr_rate": 0.0, "num_cycles": 0.3},
        {"min_lr_rate": 0.5, "num_cycles": 1.0},
    ],
    "cosine_warmup_with_min_lr": [
        {"min_lr_rate": 0.1},
        {"min_lr": 3e-5},
        {"min_lr_rate": 0.05, "warmup_lr_rate": 0.2},
        {"min_lr_rate": 0.0, "warmup_lr_rate": 0.0, "num_cycles": 0.4},
    ],
    "warmup_stable_decay": [
        {"num_decay_steps": d, "warmup_type": wt, "decay_type": dt, "min_lr_ratio": m}
        for d, wt, dt, m in itertools.product((0, 1, 5), ("linear", "cosine", "1-sqrt"), ("linear", "cosine", "1-sqrt"), (0.0, 0.1))
    ]
    + [{"num_decay_steps": 4, "num_cycles": 1.0}, {"num_decay_steps": 3, "num_stable_steps": 2}],
}

CLOSED_FORMS = [n for n in list_schedulers() if n not in ("reduce_lr_on_plateau", "greedy")]


def test_grid_covers_every_closed_form():
    assert sorted(KWARGS) == sorted(CLOSED_FORMS)


def _hf_lambda(name, warmup, total, kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = transformers.get_scheduler(
            name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=dict(kwargs)
        )
    return sched.lr_lambdas[0]


def _deviates(name: str, warmup: int, total: int, step: int) -> bool:
    """Steps where optsched deliberately differs from HF (documented in the catalog)."""
    if step < total:
        return False
    if name == "cosine_warmup_with_min_lr":
        return total > warmup  # HF rises again at T; we hold the floor reached at T - 1
    if name in ("cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial"):
        return warmup >= total  # empty decay: HF jumps to 1 (or divides by zero); ours is at the end
    return False


def _cases():
    for name, kwarg_list in KWARGS.items():
        for kwargs in kwarg_list:
            yield pytest.param(name, kwargs, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}")


@pytest.mark.parametrize(("name", "kwargs"), list(_cases()))
def test_parity_with_transformers(name, kwargs):
    compared = 0
    for warmup, total in itertools.product(WARMUPS, TOTALS):
        if name == "warmup_stable_decay" and "num_stable_steps" not in kwargs:
            if warmup + kwargs["num_decay_steps"] > total:
                continue  # a negative stable phase: a ValueError here (tested in test_errors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = build_schedule(name, warmup, total, kwargs, reference_lr=LR)
        hf = _hf_lambda(name, warmup, total, kwargs)
        for step in range(total + 1):
            if _deviates(name, warmup, total, step):
                continue
            expected, got = hf(step), ours(step)
            assert got == expected, (warmup, total, step, got, expected)
            compared += 1
    assert compared > 50


@pytest.mark.parametrize("name", ["cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr"])
def test_no_rise_after_the_end_where_hf_rises(name):
    kwargs = {} if name == "cosine" else {"min_lr_rate": 0.1}
    warmup, total = 2, 20
    hf = _hf_lambda(name, warmup, total, kwargs)
    ours = build_schedule(name, warmup, total, kwargs, reference_lr=LR)
    final = ours(total)
    assert hf(total + 5) > hf(total) + 1e-6 or hf(total + 1) > hf(total - 1)  # HF goes back up
    assert all(ours(s) == final for s in range(total, total + 30))  # ours holds
    assert final == pytest.approx(0.0 if name == "cosine" else 0.1)


def test_polynomial_warmup_equal_total_does_not_divide_by_zero():
    hf = _hf_lambda("polynomial", 5, 5, {})
    with pytest.raises(ZeroDivisionError):
        hf(5)
    ours = build_schedule("polynomial", 5, 5, {}, reference_lr=LR)
    assert ours(5) == pytest.approx(1e-7 / LR)
    assert [ours(s) for s in range(5)] == [hf(s) for s in range(5)]


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_scheduler_lrs_match_hf_lambda_lr_over_a_run(name):
    """The torch objects too: stepping both schedulers gives the same group lrs (two groups), bit for bit."""
    kwargs = {
        "cosine_with_min_lr": {"min_lr": 1e-5},
        "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
        "warmup_stable_decay": {"num_decay_steps": 4},
        "polynomial": {"power": 2.0, "lr_end": 1e-5},
    }.get(name, {})

    def make_opt():
        a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": LR * 0.1}], lr=LR)

    opt_hf, opt_ours = make_opt(), make_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.get_scheduler(name, opt_hf, 3, 15, scheduler_specific_kwargs=dict(kwargs))
        ours = get_scheduler(name, opt_ours, 3, 15, scheduler_specific_kwargs=dict(kwargs))
    for _ in range(15):
        assert [g["lr"] for g in opt_ours.param_groups] == [g["lr"] for g in opt_hf.param_groups]
        assert ours.get_last_lr() == hf.get_last_lr()
        opt_hf.step(), opt_ours.step()
        hf.step(), ours.step()


@settings(max_examples=300, deadline=None)
@given(
    warmup=st.integers(0, 50),
    decay=st.integers(0, 5000),
    at=st.floats(0.0, 1.1),
    lr=st.sampled_from([1e-3, 3e-4, 5e-5, 2e-5, 0.1]),
    lr_end_rate=st.sampled_from([0.0, 1e-4, 0.01, 0.3]),
    power=st.sampled_from([1.0, 2.0, 0.5, 3.0, 1.7]),
)
def test_linear_and_polynomial_are_hf_bit_for_bit_at_any_step(warmup, decay, at, lr, lr_end_rate, power):
    """The two forms whose decay HF writes in its own order ((T - s) / (T - W); the lr range times the
    power plus lr_end, over lr): equal at random steps of long runs, not only on the grid."""
    total = max(1, warmup + decay)  # optsched refuses a run of 0 steps
    step = int(at * total)
    kwargs = {"lr_end": lr * lr_end_rate, "power": power}
    for name, kw in (("linear", {}), ("polynomial", kwargs)):
        if name == "polynomial" and warmup >= total:
            continue  # HF divides by zero there (test_polynomial_warmup_equal_total_does_not_divide_by_zero)
        ours = build_schedule(name, warmup, total, kw, reference_lr=lr)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        hf = transformers.get_scheduler(name, opt, warmup, total, scheduler_specific_kwargs=dict(kw)).lr_lambdas[0]
        assert ours(step) == hf(step), (name, warmup, total, step)
