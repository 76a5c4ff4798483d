"""ScheduleLR: per-group base lrs, lr_at, spec, state_dict round trips, create_scheduler."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from optsched.schedules import (
    ScheduleLR,
    build_schedule,
    create_scheduler,
    get_scheduler,
    is_metric_scheduler,
    list_schedulers,
)
from optsched.schedules.core import Constant, Decay, join, warmup_then
from optsched.schedules.registry import CLOSED_FORM

KWARGS = {
    "cosine_with_min_lr": {"min_lr": 1e-4},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 5},
    "cosine_with_restarts": {"num_cycles": 3},
    "polynomial": {"power": 2.0},
}


def make_optimizer(kind="adamw"):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    groups = [{"params": [a], "name": "decay"}, {"params": [b], "lr": 2e-4, "name": "no_decay"}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-3)


def train(optimizer, scheduler, steps):
    lrs = []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", list_schedulers(CLOSED_FORM))
def test_each_group_keeps_its_base_lr_and_lr_at_matches_stepping(name):
    opt = make_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = get_scheduler(name, opt, 4, 30, KWARGS.get(name))
    assert isinstance(sched, ScheduleLR) and sched.base_lrs == [1e-3, 2e-4]
    predicted = [sched.lr_at(s) for s in range(30)]
    assert train(opt, sched, 30) == predicted
    for lrs in predicted:
        assert lrs[1] == pytest.approx(lrs[0] * 0.2, rel=1e-12, abs=1e-20)  # ratio kept throughout


@pytest.mark.parametrize("name", list_schedulers(CLOSED_FORM))
@pytest.mark.parametrize("stop", [0, 3, 17])
def test_state_dict_round_trip_mid_run_continues_identically(name, stop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer()
        sched = get_scheduler(name, opt, 4, 30, KWARGS.get(name))
        reference = train(opt, sched, 30)

        opt = make_optimizer()
        sched = get_scheduler(name, opt, 4, 30, KWARGS.get(name))
        first = train(opt, sched, stop)
        buffer = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # the spec is plain data

        opt2 = make_optimizer()
        sched2 = get_scheduler(name, opt2, 4, 30, KWARGS.get(name))
        opt2.load_state_dict(saved["opt"])
        sched2.load_state_dict(saved["sched"])
        rest = train(opt2, sched2, 30 - stop)
    assert first + rest == reference



def test_state_dict_loads_into_torchs_lambdalr_which_continues_from_the_saved_step():
    # transformers' Trainer resumes an optsched checkpoint's scheduler.pt with its own LambdaLR, whose
    # load_state_dict needs lr_lambdas (a KeyError without it); a LambdaLR state loads back into ScheduleLR
    transformers = pytest.importorskip("transformers")
    opt = make_optimizer()
    sched = get_scheduler("cosine", opt, 4, 30)
    train(opt, sched, 7)
    fresh = make_optimizer()
    theirs = transformers.get_scheduler("cosine", fresh, num_warmup_steps=4, num_training_steps=30)
    fresh.load_state_dict(opt.state_dict())  # the group lrs come back with optimizer.pt, as in a resume
    theirs.load_state_dict(torch.load(_saved(sched.state_dict()), weights_only=True))
    assert theirs.last_epoch == 7 and theirs.get_last_lr() == sched.get_last_lr()
    flat = lambda lrs: [lr for step in lrs for lr in step]  # noqa: E731
    assert flat(train(fresh, theirs, 5)) == pytest.approx(flat(train(opt, sched, 5)), rel=1e-12)
    again = get_scheduler("cosine", make_optimizer(), 4, 30)
    again.load_state_dict(theirs.state_dict())
    assert again.last_epoch == 12 and not hasattr(again, "lr_lambdas")


def _saved(state) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_load_state_dict_sets_the_optimizer_lr_even_without_optimizer_state():
    opt = make_optimizer()
    sched = get_scheduler("linear", opt, 2, 10)
    train(opt, sched, 5)
    state = sched.state_dict()
    fresh = make_optimizer()
    sched2 = get_scheduler("linear", fresh, 2, 10)
    sched2.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == sched.lr_at(5) == sched2.get_last_lr()


def test_load_state_dict_fills_a_tensor_lr_in_place():
    # torchao's low-bit AdamW keeps each group's lr as a tensor and its step() refuses a float put there:
    # a resumed run crashed at its first step. torch's schedulers fill the tensor; so does this one.
    def make():
        return torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor(1e-3), foreach=False)

    opt = make()
    sched = get_scheduler("linear", opt, 2, 10)
    train(opt, sched, 5)
    fresh = make()
    lr = fresh.param_groups[0]["lr"]
    get_scheduler("linear", fresh, 2, 10).load_state_dict(sched.state_dict())
    assert fresh.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(sched.lr_at(5)[0])


def test_load_state_dict_with_another_group_count_is_refused_and_loads_nothing():
    opt = make_optimizer()
    sched = get_scheduler("linear", opt, 2, 10)
    train(opt, sched, 5)
    one_group = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    fresh = get_scheduler("linear", one_group, 2, 10)
    with pytest.raises(ValueError, match=r"base_lrs for 2 param group\(s\), but the optimizer has 1"):
        fresh.load_state_dict(sched.state_dict())
    assert fresh.last_epoch == 0 and fresh.base_lrs == [1e-3]  # untouched: it still steps
    fresh.step()
    assert fresh.get_last_lr() == [5e-4]


def test_spec_in_state_dict_and_from_spec():
    opt = make_optimizer()
    sched = get_scheduler("COSINE", opt, 3, 40, {"num_cycles": 0.4})
    spec = {"name": "cosine", "num_warmup_steps": 3, "num_training_steps": 40, "kwargs": {"num_cycles": 0.4}}
    assert sched.spec == spec
    state = sched.state_dict()
    assert state["spec"] == spec and "schedule" not in state
    rebuilt = ScheduleLR.from_spec(make_optimizer(), state["spec"])
    assert [rebuilt.lr_at(s) for s in range(41)] == [sched.lr_at(s) for s in range(41)]


def test_changed_spec_on_load_is_logged_and_current_schedule_kept(caplog):
    opt = make_optimizer()
    old = get_scheduler("linear", opt, 2, 10)
    train(opt, old, 4)
    new = get_scheduler("cosine", make_optimizer(), 2, 10)
    with caplog.at_level("WARNING", logger="optsched.schedules.scheduler"):
        new.load_state_dict(old.state_dict())
    assert "spec" in caplog.text and "'linear'" in caplog.text
    assert new.spec["name"] == "cosine" and new.last_epoch == 4


def test_custom_composed_schedule():
    opt = make_optimizer("sgd")
    schedule = join([warmup_then(2, Constant(1.0)), Decay(4, "1-sqrt", end=0.1)], [5])
    sched = ScheduleLR(opt, schedule)
    assert sched.spec["name"] == "custom"
    lrs = [lr[0] for lr in train(opt, sched, 10)]
    assert lrs[:5] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3])
    assert lrs[-1] == pytest.approx(1e-4)
    state = sched.state_dict()
    sched2 = ScheduleLR(make_optimizer("sgd"), schedule)
    sched2.load_state_dict(state)
    assert sched2.lr_at(3) == sched.lr_at(3) and sched2.last_epoch == 10


def test_custom_plain_function_and_bad_inputs():
    opt = make_optimizer()
    sched = ScheduleLR(opt, lambda step: 0.5**step)
    assert sched.lr_at(2) == pytest.approx([2.5e-4, 5e-5])
    with pytest.raises(ValueError, match="step=-1"):
        sched.lr_at(-1)
    with pytest.raises(TypeError, match="callable"):
        ScheduleLR(opt, 0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        get_scheduler("linear", object(), 1, 10)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda opt: ScheduleLR(None, Constant(1.0)), TypeError, "optimizer must be a torch.optim.Optimizer, got NoneType"),
        (lambda opt: ScheduleLR("sgd", Constant(1.0)), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), last_epoch=None), TypeError, "last_epoch must be an integer, got NoneType"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), last_epoch=-2), ValueError, r"last_epoch=-2 is out of range"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), last_epoch=5), ValueError, "last_epoch=5 resumes a scheduler.*'initial_lr'.*last_epoch=-1"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), spec="cosine"), TypeError, "spec must be a dict .*got str 'cosine'"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), spec={"nme": "x"}), ValueError, r"spec=\{'nme': 'x'\} has unknown key\(s\) \['nme'\]"),
        (lambda opt: ScheduleLR(opt, Constant(1.0), spec={"num_warmup_steps": 2}), ValueError, "has no 'name'"),
        (lambda opt: ScheduleLR(opt, Constant(1.0)).load_state_dict(None), TypeError, "state_dict must be a dict .*got NoneType None"),
    ],
)
def test_schedule_lr_refuses_bad_input_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call(make_optimizer("sgd"))


def test_min_lr_is_relative_to_the_default_lr_per_group():
    """min_lr is the floor of a group at the optimizer's lr; a group at 0.2x ends at 0.2 * min_lr."""
    opt = make_optimizer()
    sched = get_scheduler("cosine_with_min_lr", opt, 0, 10, {"min_lr": 1e-4})
    assert sched.lr_at(10) == pytest.approx([1e-4, 2e-5])


def test_metric_schedulers_are_recognised():
    opt = make_optimizer()
    assert is_metric_scheduler(get_scheduler("reduce_lr_on_plateau", opt))
    assert is_metric_scheduler(get_scheduler("greedy", make_optimizer()))
    assert not is_metric_scheduler(get_scheduler("linear", make_optimizer(), 0, 5))


def test_create_scheduler_reads_the_arguments():
    from optsched.arguments import TrainingArguments

    args = TrainingArguments(
        output_dir="out", lr_scheduler_type="cosine_with_min_lr", warmup_steps=0.1, lr_scheduler_kwargs='{"min_lr_rate": 0.1}'
    )
    sched = create_scheduler(make_optimizer(), args, 50)
    assert sched.spec == {
        "name": "cosine_with_min_lr",
        "num_warmup_steps": 5,
        "num_training_steps": 50,
        "kwargs": {"min_lr_rate": 0.1},
    }
    assert create_scheduler(make_optimizer(), None, 10).spec["name"] == "linear"
    with pytest.raises(ValueError, match="num_training_steps=0"):
        create_scheduler(make_optimizer(), args, 0)


def test_create_scheduler_accepts_transformers_arguments(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), lr_scheduler_type="polynomial", warmup_steps=3, lr_scheduler_kwargs={"power": 2.0}
    )
    ours = create_scheduler(make_optimizer(), hf_args, 20)
    hf_trainer_like = transformers.get_scheduler(
        "polynomial", make_optimizer(), num_warmup_steps=3, num_training_steps=20, scheduler_specific_kwargs={"power": 2.0}
    )
    assert ours.spec["kwargs"] == {"power": 2.0}
    assert [ours.lr_at(s)[0] for s in range(20)] == pytest.approx(
        [hf_trainer_like.lr_lambdas[0](s) * 1e-3 for s in range(20)], rel=1e-9
    )


def test_build_schedule_needs_no_optimizer():
    f = build_schedule("linear", 2, 10)
    assert [10 * f(s) for s in range(10)] == pytest.approx([0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25])
