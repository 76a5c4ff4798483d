"""reduce_lr_on_plateau and greedy: HF's behaviour on metric sequences, state_dict round trips."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from optsched.schedules import get_scheduler
from optsched.schedules.greedy import GreedyLR
from optsched.schedules.plateau import PlateauLR


def make_optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1)


def metrics(seed: int, n: int = 300) -> list[float]:
    """A noisy loss that improves, plateaus, improves again."""
    rng = random.Random(seed)
    out, level = [], 1.0
    for i in range(n):
        if (i // 40) % 2 == 0:
            level *= 0.97
        out.append(level + rng.uniform(-0.01, 0.01))
    return out


GREEDY_KWARGS = [
    {},
    {"patience": 2, "factor": 0.8, "min_lr": 0.01, "max_lr": 0.5},
    {"patience": 1, "cooldown": 2, "warmup": 3, "threshold_mode": "rel", "threshold": 0.01, "min_lr": 0.02},
    {"patience": 1, "smooth": True, "window_size": 5, "min_lr": [0.05, 0.04], "reset_start": 3},
    {"mode": "max", "patience": 2, "min_lr": 0.001},
]


@pytest.mark.parametrize("kwargs", GREEDY_KWARGS)
def test_greedy_matches_transformers(kwargs):
    transformers_optimization = pytest.importorskip("transformers.optimization")
    opt_hf, opt_ours = make_optimizer(), make_optimizer()
    hf = transformers_optimization.GreedyLR(opt_hf, **copy.deepcopy(kwargs))
    ours = get_scheduler("greedy", opt_ours, scheduler_specific_kwargs=copy.deepcopy(kwargs))
    assert isinstance(ours, GreedyLR)
    changes = 0
    for m in metrics(1):
        hf.step(m), ours.step(m)
        assert ours.get_last_lr() == hf.get_last_lr()
        changes += ours.get_last_lr() != [0.1, 0.05]
    assert changes > 0  # the sequence does move the lr


@pytest.mark.parametrize("kwargs", GREEDY_KWARGS)
def test_greedy_state_dict_round_trip(kwargs):
    seq = metrics(2)
    ref_opt = make_optimizer()
    ref = get_scheduler("greedy", ref_opt, scheduler_specific_kwargs=copy.deepcopy(kwargs))
    expected = []
    for m in seq:
        ref.step(m)
        expected.append(ref.get_last_lr())
    opt = make_optimizer()
    sched = get_scheduler("greedy", opt, scheduler_specific_kwargs=copy.deepcopy(kwargs))
    got = []
    for m in seq[:137]:
        sched.step(m)
        got.append(sched.get_last_lr())
    state = copy.deepcopy(sched.state_dict())
    assert state["spec"]["name"] == "greedy"
    opt2 = make_optimizer()  # fresh lrs: load_state_dict must put the saved ones back
    sched2 = get_scheduler("greedy", opt2, scheduler_specific_kwargs=copy.deepcopy(kwargs))
    sched2.load_state_dict(state)
    for m in seq[137:]:
        sched2.step(m)
        got.append(sched2.get_last_lr())
    assert got == expected


def test_greedy_state_for_another_group_count_is_refused_and_loads_nothing():
    sched = GreedyLR(make_optimizer(), patience=0)
    for m in metrics(5, 20):
        sched.step(m)
    one = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    fresh = GreedyLR(one, patience=0)
    with pytest.raises(ValueError, match=r"min_lrs for 2 param group\(s\), but the optimizer has 1"):
        fresh.load_state_dict(sched.state_dict())
    assert fresh.last_epoch == 0 and fresh.min_lrs == [1e-3] and one.param_groups[0]["lr"] == 0.5


def test_greedy_fills_a_tensor_lr_in_place():
    # an optimizer that keeps lr as a tensor (torchao's low-bit AdamW) refuses a float in its group
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1), foreach=False)
    lr = opt.param_groups[0]["lr"]
    sched = get_scheduler("greedy", opt, scheduler_specific_kwargs={"patience": 1, "min_lr": 0.01})
    for m in [1.0] + [2.0] * 6:
        sched.step(m)
    assert opt.param_groups[0]["lr"] is lr and lr.item() < 0.1
    sched.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] is lr


def test_greedy_loads_a_transformers_state_dict():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    opt_hf = make_optimizer()
    hf = transformers_optimization.GreedyLR(opt_hf, patience=1)
    for m in metrics(3, 50):
        hf.step(m)
    ours = GreedyLR(make_optimizer(), patience=1)
    ours.load_state_dict(hf.state_dict())
    for m in metrics(4, 50):
        hf.step(m), ours.step(m)
        assert ours.get_last_lr() == hf.get_last_lr()


def test_greedy_is_a_plateau_scheduler_and_logs(caplog):
    opt = make_optimizer()
    sched = GreedyLR(opt, patience=0, verbose=True, min_lr=0.0)
    assert isinstance(sched, ReduceLROnPlateau)
    with caplog.at_level("INFO", logger="optsched.schedules.greedy"):
        for m in (1.0, 2.0, 3.0):
            sched.step(m)
    assert "reducing learning rate of group 0" in caplog.text


@pytest.mark.parametrize("kwargs", [{}, {"patience": 2, "factor": 0.5, "cooldown": 1, "min_lr": 0.01}])
def test_plateau_matches_torch_and_hf(kwargs):
    transformers = pytest.importorskip("transformers")
    opt_hf, opt_ours = make_optimizer(), make_optimizer()
    hf = transformers.get_scheduler("reduce_lr_on_plateau", opt_hf, scheduler_specific_kwargs=dict(kwargs))
    ours = get_scheduler("reduce_lr_on_plateau", opt_ours, 5, 100, dict(kwargs))
    assert isinstance(ours, PlateauLR) and isinstance(ours, ReduceLROnPlateau)
    assert ours.spec == {"name": "reduce_lr_on_plateau", "num_warmup_steps": 5, "num_training_steps": 100, "kwargs": kwargs}
    for m in metrics(5):
        hf.step(m), ours.step(m)
        assert ours.get_last_lr() == hf.get_last_lr()
    assert ours.get_last_lr() != [0.1, 0.05]


def test_plateau_state_dict_round_trip():
    seq = metrics(6)
    opt = make_optimizer()
    sched = get_scheduler("plateau", opt, scheduler_specific_kwargs={"patience": 2})
    for m in seq[:100]:
        sched.step(m)
    state = sched.state_dict()
    assert state["spec"]["kwargs"] == {"patience": 2}
    opt2 = make_optimizer()
    opt2.load_state_dict(opt.state_dict())
    sched2 = get_scheduler("plateau", opt2, scheduler_specific_kwargs={"patience": 2})
    sched2.load_state_dict(state)
    for m in seq[100:]:
        sched.step(m), sched2.step(m)
        assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("greedy", {"factor": 1.0}, ValueError, "factor=1.0"),
        ("greedy", {"mode": "minimum"}, ValueError, "mode='minimum'"),
        ("greedy", {"min_lr": [0.1]}, ValueError, "one per param group"),
        ("greedy", {"window_size": 0}, ValueError, "window_size=0"),
        ("greedy", {"smooth": 1}, TypeError, "smooth must be True or False"),
        ("reduce_lr_on_plateau", {"factor": 0.0}, ValueError, "factor=0.0"),
        ("reduce_lr_on_plateau", {"threshold_mode": "relative"}, ValueError, "threshold_mode='relative'"),
        ("reduce_lr_on_plateau", {"patience": -1}, ValueError, "patience=-1"),
    ],
)
def test_metric_errors(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        get_scheduler(name, make_optimizer(), scheduler_specific_kwargs=kwargs)
