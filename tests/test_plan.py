"""optsched.explain: groups, schedule (closed form, sampled, HF parity), memory, rendering."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from optsched.arguments import TrainingArguments
from optsched.demo import build_model
from optsched.optim import create_optimizer
from optsched.plan import ExplainReport, explain, format_table, sample_lrs
from optsched.schedules import create_scheduler, get_scheduler


def _setup(**kw):
    model = build_model()
    args = TrainingArguments(learning_rate=1e-3, weight_decay=0.01, **kw)
    optimizer = create_optimizer(model, args)
    return model, args, optimizer


def test_groups_and_closed_form_schedule() -> None:
    model, args, optimizer = _setup(warmup_steps=10, lr_scheduler_type="cosine")
    scheduler = create_scheduler(optimizer, args, 100)
    report = explain(optimizer, scheduler, model)
    assert [g.name for g in report.groups] == ["decay", "no_decay"]
    assert [g.weight_decay for g in report.groups] == [0.01, 0.0]
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(g.num_elements for g in report.groups) == total == report.model["trainable_elements"]
    assert report.groups[0].sample_names[0] == "bert.embeddings.word_embeddings.weight"
    s = report.schedule
    assert (s.type, s.num_warmup_steps, s.num_training_steps, s.method) == ("cosine", 10, 100, "closed form")
    assert [(label, step) for label, step, _ in s.key_steps] == [
        ("start", 0), ("end of warmup", 10), ("middle", 50), ("last", 99)]
    for _, step, lrs in s.key_steps:
        assert lrs == scheduler.lr_at(step)
    assert s.key_steps[1][2] == [1e-3, 1e-3]
    assert s.final_lrs == scheduler.lr_at(100) == [0.0, 0.0]
    assert report.memory_estimate is not None and report.memory_actual is None
    assert report.memory_estimate.total_bytes == 8 * total + 4 * sum(g.num_tensors for g in report.groups)
    assert report.notes == []  # every trainable tensor is in a group


def test_actual_memory_after_a_step() -> None:
    model, args, optimizer = _setup()
    model(torch.randint(0, 8, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    report = explain(optimizer, None, model)
    assert report.memory_actual is not None
    assert report.memory_actual.total_bytes == report.memory_estimate.total_bytes
    assert report.schedule.method == "constant" and report.schedule.final_lrs == [1e-3, 1e-3]
    assert "actual:" in str(report)


HF_NAMES = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "inverse_sqrt"]


@pytest.mark.parametrize("name", HF_NAMES)
def test_sampled_hf_scheduler_matches_stepping_and_ours(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    param = nn.Parameter(torch.zeros(2))
    hf_opt = torch.optim.SGD([param], lr=0.1)
    hf_sched = transformers.get_scheduler(name, hf_opt, num_warmup_steps=5, num_training_steps=40)
    report = explain(hf_opt, hf_sched, num_training_steps=40)
    assert report.schedule.method == "sampled"
    assert report.schedule.num_warmup_steps == 5
    # the original was not stepped
    assert hf_sched.last_epoch == 0 and hf_opt.param_groups[0]["lr"] == pytest.approx(hf_sched.get_last_lr()[0])
    # reference: step the real HF scheduler
    expected = {}
    for step in range(41):
        expected[step] = hf_opt.param_groups[0]["lr"]
        hf_opt.step()
        hf_sched.step()
    for _, step, lrs in report.schedule.key_steps:
        assert lrs[0] == pytest.approx(expected[step], abs=1e-12)
    assert report.schedule.final_lrs[0] == pytest.approx(expected[40], abs=1e-12)
    # optsched's closed form of the same name agrees
    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    ours = explain(ours_opt, get_scheduler(name, ours_opt, 5, 40))
    for (_, s1, a), (_, s2, b) in zip(ours.schedule.key_steps, report.schedule.key_steps):
        assert s1 == s2 and a[0] == pytest.approx(b[0], abs=1e-12)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 2}),
        ("polynomial", {"power": 2.0}),
        ("constant_with_warmup", {}),
        ("inverse_sqrt", {}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
        ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
        ("warmup_stable_decay", {"num_decay_steps": 10}),
    ],
)
def test_a_transformers_schedule_is_named_by_its_lr_scheduler_type(name: str, kwargs: dict) -> None:
    # the type was the lambda's name cut down: constant_with_warmup showed as 'constant', cosine_with_min_lr
    # as 'cosine', warmup_stable_decay as 'wsd_scheduler_lambda' (and its length as unknown)
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=5, num_training_steps=40,
                                           scheduler_specific_kwargs=kwargs)
    schedule = explain(optimizer, scheduler).schedule
    assert schedule.type == name
    assert schedule.num_warmup_steps == 5
    if name != "constant_with_warmup" and name != "inverse_sqrt":  # these two do not bind the total
        assert schedule.num_training_steps == 40 and schedule.method == "sampled"


def test_plain_torch_optimizer_and_scheduler() -> None:
    a, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1.0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    unknown = explain(optimizer, scheduler)
    assert unknown.schedule.method == "unknown" and "num_training_steps" in unknown.schedule.note
    report = explain(optimizer, scheduler, num_training_steps=30)
    assert [g.name for g in report.groups] == ["group 0", "group 1"]
    assert [g.base_lr for g in report.groups] == [1.0, 0.5]
    steps = {step: lrs for _, step, lrs in report.schedule.key_steps}
    assert steps[15] == pytest.approx([0.1, 0.05]) and steps[29] == pytest.approx([0.01, 0.005])
    assert report.schedule.final_lrs == pytest.approx([0.001, 0.0005])
    assert optimizer.param_groups[0]["lr"] == 1.0 and scheduler.last_epoch == 0  # untouched
    text = str(report)
    assert "group 1" in text and "StepLR" in text


def test_sampling_shares_parameters_and_refuses_past_steps() -> None:
    param = nn.Parameter(torch.zeros(1000))
    optimizer = torch.optim.Adam([param], lr=1.0)
    param.grad = torch.ones(1000)
    optimizer.step()
    state_before = optimizer.state[param]["exp_avg"].clone()
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    assert sample_lrs(optimizer, scheduler, [0, 3]) == {0: [1.0], 3: [0.125]}
    assert torch.equal(optimizer.state[param]["exp_avg"], state_before)
    scheduler.step()
    with pytest.raises(ValueError, match="at step 1 already"):
        sample_lrs(optimizer, scheduler, [0])
    with pytest.raises(ValueError, match="too far"):
        sample_lrs(optimizer, scheduler, [10**9])


def test_metric_scheduler_is_reported_unknown() -> None:
    model, args, optimizer = _setup(lr_scheduler_type="reduce_lr_on_plateau")
    report = explain(optimizer, create_scheduler(optimizer, args, 50), model)
    assert report.schedule.method == "unknown" and "metric" in report.schedule.note


def test_rules_settings_and_missing_params_are_shown() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight], "name": "body", "rule": "0.*", "param_names": ["0.weight"], "betas": (0.9, 0.95)},
            {"params": [model[1].weight], "name": "head", "param_names": ["1.weight"]},
        ],
        lr=1e-3,
    )
    report = explain(optimizer, model=model)
    assert report.groups[0].rule == "0.*" and report.groups[1].rule is None
    assert report.groups[0].settings == {"betas": (0.9, 0.95)}
    assert report.model["not_optimized"] == ["0.bias", "1.bias"]
    text = str(report)
    assert "rule" in text and "0.*" in text and "betas" in text
    assert "2 trainable tensor(s) are in no param group" in text


def test_to_dict_is_json_and_str_has_sections() -> None:
    model, args, optimizer = _setup(warmup_steps=5)
    report = explain(optimizer, create_scheduler(optimizer, args, 20), model)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schedule"]["type"] == "linear" and len(data["groups"]) == 2
    assert data["memory_estimate"]["optim"] == report.optimizer_name
    text = str(report)
    for section in ("Param groups", "Schedule", "Optimizer-state memory", "end of warmup", "final"):
        assert section in text
    assert isinstance(report, ExplainReport)


def test_unknown_optimizer_class_has_no_estimate() -> None:
    optimizer = torch.optim.LBFGS([nn.Parameter(torch.zeros(2))])
    report = explain(optimizer)
    assert report.memory_estimate is None
    assert any("register_state_formula" in n for n in report.notes)


def test_errors() -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        explain("adamw")  # type: ignore[arg-type]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match="Module"):
        explain(optimizer, model="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_training_steps"):
        explain(optimizer, num_training_steps=0)


def test_format_table_aligns_numbers_right() -> None:
    text = format_table(["name", "n"], [["a", 1], ["bbb", 100]])
    assert text.splitlines() == ["name    n", "----  ---", "a       1", "bbb   100"]


def test_explain_names_a_compiled_model_as_its_groups_do() -> None:
    # the model's totals named torch.compile's wrapper ("OptimizedModule") and its tensors "_orig_mod.<name>",
    # while create_optimizer names the groups' parameters after the model itself
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD([model[0].weight], lr=0.1)  # the other tensors are in no group
    report = explain(optimizer, model=torch.compile(model, backend="eager"))
    assert report.model["class"] == "Sequential"
    assert report.model["not_optimized"] == ["0.bias", "1.weight", "1.bias"]
