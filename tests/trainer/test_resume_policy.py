"""lr_resume_policy: the plan saved in a checkpoint, compared on resume; replan / continue / strict."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.schedules import get_scheduler
from optsched.trainer.resume import (
    PLAN_NAME,
    ResumeContext,
    compare_plans,
    load_plan,
    prepare_resume,
    resolve_plan,
    restore_scheduler,
)

RESUME_LOGGER = "optsched.trainer.resume"
LR = 1e-2  # make_args' learning_rate


# ---- the seed's example: 3 epochs, then resume with num_train_epochs=5 ------------------------------
# 16 samples / batch 4 = 4 updates per epoch: the first run is 12 steps (checkpoints 4, 8, 12), the new
# plan 20. The resume point is checkpoint-8 (mid-decay, lr > 0), as the seed resumes mid-run.


def _logged_lr(trainer: Trainer) -> dict[int, float]:
    """log step k (1-based) -> the lr optimizer step k used."""
    return {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture
def first_run(model_factory, regression_data, make_args):
    data = regression_data(16)
    first = Trainer(model_factory(dropout=0.2), make_args(num_train_epochs=3, save_strategy="epoch", warmup_steps=2),
                    train_dataset=data)
    first.train()
    return first, data


def _resume(model_factory, make_args, data, caplog, step=8, **kwargs):
    args = dict(num_train_epochs=5, warmup_steps=2)
    args.update(kwargs)
    t = Trainer(model_factory(dropout=0.2, seed=7), make_args(**args), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger=RESUME_LOGGER):
        t.train(resume_from_checkpoint=f"{t.args.output_dir}/checkpoint-{step}")
    return t


def _resume_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == RESUME_LOGGER and r.levelno >= logging.WARNING]


def test_checkpoint_stores_the_resolved_plan(first_run):
    first, _ = first_run
    plan = json.loads(Path(first.args.output_dir, "checkpoint-8", PLAN_NAME).read_text())
    assert plan["schedule"] == {"name": "linear", "num_warmup_steps": 2, "num_training_steps": 12, "kwargs": {}}
    assert plan["step"] == 8 and plan["continuation"] is None and plan["optimizer"] == "AdamW"
    names = [g["name"] for g in plan["param_groups"]]
    assert names == ["decay", "no_decay"]
    assert plan["param_groups"][0]["param_names"] == ["inp.weight", "out.weight"]
    for g in plan["param_groups"]:
        assert g["lr"] == LR and g["current_lr"] == pytest.approx(LR * (12 - 8) / 10, rel=1e-12)
        assert g["settings"]["betas"] == [0.9, 0.999] and "weight_decay" in g["settings"]
        assert "params" not in g["settings"] and "initial_lr" not in g["settings"]


def test_replan_follows_new_plan_and_warns_both_lrs(first_run, model_factory, make_args, caplog):
    first, data = first_run
    t = _resume(model_factory, make_args, data, caplog)  # lr_resume_policy defaults to "replan"
    old_lr = first.lr_scheduler.lr_at(8)[0]  # what step 9 used in the first run
    new_lr = t.lr_scheduler.lr_at(8)[0]
    assert old_lr == pytest.approx(LR * 4 / 10) and new_lr == pytest.approx(LR * 12 / 18)
    assert _logged_lr(t)[9] == new_lr  # the first resumed step: the new plan, never the stale lr
    assert [_logged_lr(t)[s + 1] for s in range(8, 20)] == [t.lr_scheduler.lr_at(s)[0] for s in range(8, 20)]
    (msg,) = _resume_warnings(caplog)
    assert "schedule.num_training_steps: 12 -> 20" in msg
    assert f"lr [{old_lr:.6g}, {old_lr:.6g}] -> [{new_lr:.6g}, {new_lr:.6g}]" in msg
    assert t.state.global_step == 20


def test_continue_keeps_lr_continuous_and_reaches_new_end(first_run, model_factory, make_args, caplog):
    first, data = first_run
    t = _resume(model_factory, make_args, data, caplog, lr_resume_policy="continue", save_strategy="epoch")
    lrs, before = _logged_lr(t), _logged_lr(first)
    # continuity: the first resumed step (log step 9) uses the lr the checkpoint's run used for it
    assert math.isclose(lrs[9], before[9], rel_tol=1e-12)
    # then the new plan's shape (linear) from there to the new end (0 at step 20): lr(s) = lr8 * (20 - s) / 12
    for s in range(8, 20):
        assert math.isclose(lrs[s + 1], before[9] * (20 - s) / 12, rel_tol=1e-12, abs_tol=1e-18), s
    assert t.lr_scheduler.lr_at(20) == [0.0, 0.0]
    (msg,) = _resume_warnings(caplog)
    assert "lr_resume_policy='continue'" in msg and "schedule.num_training_steps: 12 -> 20" in msg
    assert f"lr [{before[9]:.6g}, {before[9]:.6g}] -> [{lrs[9]:.6g}, {lrs[9]:.6g}]" in msg
    # the checkpoints of the continued run carry the continuation
    plan = load_plan(f"{t.args.output_dir}/checkpoint-16")
    assert plan["continuation"]["from_step"] == 8
    assert plan["continuation"]["multiplier"] == pytest.approx(0.4, rel=1e-12)


def test_continued_run_resumes_bitwise_from_its_own_checkpoint(first_run, model_factory, make_args, caplog):
    _, data = first_run
    continued = _resume(model_factory, make_args, data, caplog, lr_resume_policy="continue", save_strategy="epoch")
    caplog.clear()
    again = _resume(model_factory, make_args, data, caplog, step=16)  # same arguments, default policy
    assert _resume_warnings(caplog) == []
    assert [_logged_lr(again)[k] for k in range(17, 21)] == [_logged_lr(continued)[k] for k in range(17, 21)]
    for p, q in zip(continued.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_strict_lists_every_difference(first_run, model_factory, make_args):
    _, data = first_run
    model = model_factory()
    model.norm.bias.requires_grad_(False)
    t = Trainer(model, make_args(num_train_epochs=5, warmup_steps=3, weight_decay=0.1, lr_scheduler_type="cosine",
                                 lr_resume_policy="strict"), train_dataset=data)
    with pytest.raises(ValueError) as err:
        t.train(resume_from_checkpoint=f"{t.args.output_dir}/checkpoint-8")
    msg = str(err.value)
    for part in ("lr_resume_policy='strict'", "schedule.name: 'linear' -> 'cosine'",
                 "schedule.num_warmup_steps: 2 -> 3", "schedule.num_training_steps: 12 -> 20",
                 "group 0 ('decay').weight_decay: 0.0 -> 0.1", "group 1 ('no_decay') parameters",
                 "['norm.bias']", "lr_resume_policy='replan'"):
        assert part in msg, part


def test_strict_accepts_an_unchanged_plan(first_run, model_factory, make_args, caplog):
    _, data = first_run
    t = _resume(model_factory, make_args, data, caplog, num_train_epochs=3, lr_resume_policy="strict")
    assert t.state.global_step == 12 and _resume_warnings(caplog) == []


@pytest.mark.parametrize("policy", ["replan", "continue", "strict"])
def test_unchanged_plan_is_bitwise_identical_under_every_policy(first_run, model_factory, make_args, caplog, policy):
    first, data = first_run
    t = _resume(model_factory, make_args, data, caplog, num_train_epochs=3, lr_resume_policy=policy)
    assert _resume_warnings(caplog) == []
    assert [_logged_lr(t)[k] for k in range(9, 13)] == [_logged_lr(first)[k] for k in range(9, 13)]
    for p, q in zip(first.model.parameters(), t.model.parameters()):
        assert torch.equal(p, q)
    sa, sb = first.optimizer.state_dict(), t.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][name])


def test_replan_applies_new_group_settings(first_run, model_factory, make_args, caplog):
    _, data = first_run
    t = _resume(model_factory, make_args, data, caplog, weight_decay=0.1)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1  # torch's load_state_dict alone would restore 0.0
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert "group 0 ('decay').weight_decay: 0.0 -> 0.1" in _resume_warnings(caplog)[0]


@pytest.mark.parametrize("policy", ["replan", "continue", "strict"])
@pytest.mark.parametrize("optim", ["sgd", "adafactor"])
def test_another_optimizer_is_refused_before_its_state_is_loaded(first_run, model_factory, make_args, caplog,
                                                                  policy, optim):
    """AdamW's state went into SGD's groups without a word (replacing momentum / dampening, its moments
    carried along into the next checkpoint) and into Adafactor's until its first step's KeyError 'beta1'."""
    _, data = first_run
    t = Trainer(model_factory(), make_args(num_train_epochs=3, optim=optim, lr_resume_policy=policy),
                train_dataset=data)
    settings = lambda: [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}  # noqa: E731
                        for g in t.optimizer.param_groups]
    fresh = settings()
    with pytest.raises(ValueError) as err:
        t.train(resume_from_checkpoint=f"{t.args.output_dir}/checkpoint-8")
    cls = type(t.optimizer).__name__
    assert f"saved by AdamW, but the arguments now build {cls}" in str(err.value)
    assert "the checkpoint's optim" in str(err.value) and "fresh optimizer" in str(err.value)
    assert t.optimizer.state_dict()["state"] == {}  # nothing of AdamW's was loaded
    assert settings() == fresh and "betas" not in fresh[0]
    assert _resume_warnings(caplog) == []


def test_another_optimizer_resumes_a_checkpoint_without_optimizer_state(model_factory, regression_data, make_args,
                                                                        caplog):
    data = regression_data(16)
    Trainer(model_factory(), make_args(num_train_epochs=3, save_strategy="epoch", warmup_steps=2,
                                       save_only_model=True), train_dataset=data).train()
    t = _resume(model_factory, make_args, data, caplog, num_train_epochs=3, optim="sgd")
    assert t.state.global_step == 12 and type(t.optimizer).__name__ == "SGD"
    assert "optimizer: 'AdamW' -> 'SGD'" in _resume_warnings(caplog)[0]


@pytest.mark.parametrize("policy", ["replan", "strict"])
def test_a_parameter_moved_to_another_group_is_named_as_moved(first_run, model_factory, make_args, policy):
    """param_rules giving out.weight a group of its own: both messages said it was frozen or removed, and
    strict listed the checkpoint's groups as 'in the checkpoint only (frozen or removed since)'."""
    _, data = first_run
    rules = [{"params": "out.weight", "weight_decay": 0.3}]
    t = Trainer(model_factory(), make_args(num_train_epochs=3, param_rules=rules, lr_resume_policy=policy),
                train_dataset=data)
    with pytest.raises(ValueError) as err:
        t.train(resume_from_checkpoint=f"{t.args.output_dir}/checkpoint-8")
    msg = str(err.value)
    assert "frozen or removed" not in msg and "out.weight" in msg
    if policy == "strict":
        assert "param_groups: ['decay', 'no_decay'] -> ['decay', 'no_decay', 'out.weight']" in msg
        assert "group 0 ('decay') parameters: moved to another group since: ['out.weight']" in msg
        assert "once the parameter groups are as in the checkpoint" in msg
    else:
        assert "group 0 ('decay'): in another group now: ['out.weight']" in msg
        assert "param_rules" in msg


def test_continue_from_a_finished_run_says_the_lr_stays_0(first_run, model_factory, make_args, caplog):
    """The documented edge: the continuous lr of a run whose schedule ended is 0; the warning said only
    're-planned from multiplier 0', and the 8 extra steps trained at lr 0."""
    _, data = first_run
    t = _resume(model_factory, make_args, data, caplog, step=12, lr_resume_policy="continue")
    assert set(_logged_lr(t)[k] for k in range(13, 21)) == {0.0}
    (msg,) = _resume_warnings(caplog)
    assert "every remaining step keeps lr 0" in msg and "lr_resume_policy='replan'" in msg
    caplog.clear()
    _resume(model_factory, make_args, data, caplog, lr_resume_policy="continue")  # from step 8: lr 0.004
    assert "keeps lr 0" not in _resume_warnings(caplog)[0]


def test_continue_without_optimizer_state_uses_the_plan_file(model_factory, regression_data, make_args, caplog):
    data = regression_data(16)
    first = Trainer(model_factory(), make_args(num_train_epochs=3, save_strategy="epoch", warmup_steps=2,
                                               save_only_model=True), train_dataset=data)
    first.train()
    t = _resume(model_factory, make_args, data, caplog, lr_resume_policy="continue")
    assert math.isclose(_logged_lr(t)[9], _logged_lr(first)[9], rel_tol=1e-12)


def test_unknown_policy_suggests_the_closest():
    with pytest.raises(ValueError, match=r"lr_resume_policy='contine'.*Did you mean 'continue'"):
        TrainingArguments(lr_resume_policy="contine")
    with pytest.raises(TypeError, match="lr_resume_policy must be a string"):
        TrainingArguments(lr_resume_policy=1)


# ---- plans and their comparison ------------------------------------------------------------------


def _optimizer_and_scheduler(wd: float = 0.0, total: int = 10):
    model = torch.nn.Linear(3, 2)
    groups = [{"params": [model.weight], "param_names": ["weight"], "name": "decay", "weight_decay": wd},
              {"params": [model.bias], "param_names": ["bias"], "name": "no_decay", "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1)
    return opt, get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=total)


def test_resolve_plan_is_json_without_tensors():
    opt, sched = _optimizer_and_scheduler()
    plan = resolve_plan(opt, sched)
    assert json.loads(json.dumps(plan)) == plan
    assert plan["param_groups"][1] == {
        "name": "no_decay", "param_names": ["bias"], "num_params": 1, "lr": 0.1, "current_lr": 0.0,
        "settings": plan["param_groups"][1]["settings"],
    }
    assert plan["param_groups"][1]["settings"]["weight_decay"] == 0.0


def test_compare_plans_lists_each_difference():
    saved = resolve_plan(*_optimizer_and_scheduler())
    new = resolve_plan(*_optimizer_and_scheduler(wd=0.5, total=20))
    assert compare_plans(saved, saved) == []
    assert [str(d) for d in compare_plans(saved, new)] == [
        "schedule.num_training_steps: 10 -> 20",
        "group 0 ('decay').weight_decay: 0.0 -> 0.5",
    ]
    renamed = json.loads(json.dumps(new))
    renamed["param_groups"][0]["param_names"] = ["weight", "extra"]
    kinds = {d.kind for d in compare_plans(saved, renamed)}
    assert kinds == {"schedule", "setting", "membership"}


def test_continue_refuses_changed_group_ratios(tmp_path):
    opt, sched = _optimizer_and_scheduler()
    (tmp_path / PLAN_NAME).write_text(json.dumps(resolve_plan(opt, sched)))
    new_opt, new_sched = _optimizer_and_scheduler(total=20)
    ctx = prepare_resume(new_opt, new_sched, tmp_path, "continue")
    new_opt.param_groups[0]["lr"], new_opt.param_groups[1]["lr"] = 0.05, 0.02  # as if loaded from the checkpoint
    saved = dict(ctx.saved_plan)
    saved["param_groups"] = [dict(g, current_lr=lr) for g, lr in zip(saved["param_groups"], (0.05, 0.02))]
    ctx = ResumeContext(ctx.policy, saved, ctx.new_plan, ctx.differences, ctx.group_settings)
    with pytest.raises(ValueError, match="relative lrs changed"):
        restore_scheduler(new_sched, new_opt, None, 5, ctx)


def test_prepare_resume_rejects_unknown_policy_and_bad_plan_file(tmp_path):
    opt, sched = _optimizer_and_scheduler()
    with pytest.raises(ValueError, match="Did you mean 'strict'"):
        prepare_resume(opt, sched, tmp_path, "strikt")
    (tmp_path / PLAN_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare_resume(opt, sched, tmp_path, "replan")
    (tmp_path / PLAN_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        load_plan(tmp_path)


def test_docs_example_runs_and_prints_what_the_docs_show(tmp_path, capsys):
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "resume.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[0]
    exec(compile(code, "docs/resume.md", "exec"), {"__name__": "docs_example"})
    printed = [line for line in capsys.readouterr().out.splitlines() if "lr of steps" in line]
    shown = [line for line in doc.splitlines() if line.startswith(("replan: lr of", "continue: lr of"))]
    assert printed == shown and len(shown) == 2


# ---- a checkpoint of transformers' own Trainer: no plan file, a scheduler.pt without a spec --------


@pytest.fixture
def transformers_run(regression_data, tmp_path):
    """transformers' Trainer on the same model and data: 3 epochs of 4 steps, linear, a checkpoint per epoch."""
    transformers = pytest.importorskip("transformers")
    from trainer_helpers import TinyRegressor

    data = regression_data(16)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=3, save_strategy="epoch", per_device_train_batch_size=4,
        learning_rate=LR, warmup_steps=2, logging_steps=1, disable_tqdm=True, use_cpu=True, report_to="none")
    torch.manual_seed(0)
    hf = transformers.Trainer(TinyRegressor(), args, train_dataset=data)
    hf.train()
    assert not Path(args.output_dir, "checkpoint-8", PLAN_NAME).exists()
    return hf, data


@pytest.mark.parametrize("policy", ["replan", "continue", "strict"])
def test_a_transformers_checkpoint_with_an_unchanged_plan_continues_its_lrs(transformers_run, model_factory,
                                                                           make_args, caplog, policy):
    hf, data = transformers_run
    t = _resume(model_factory, make_args, data, caplog, num_train_epochs=3, lr_resume_policy=policy)
    assert _resume_warnings(caplog) == []
    assert [_logged_lr(t)[k] for k in range(9, 13)] == pytest.approx([_logged_lr(hf)[k] for k in range(9, 13)],
                                                                      rel=1e-12)


def test_a_transformers_checkpoint_with_a_changed_plan_follows_each_policy(transformers_run, model_factory,
                                                                          make_args, caplog):
    """Its scheduler.pt holds no spec and the same base lrs: the changed total was taken for the same plan,
    so every policy silently re-planned (continue jumped, strict accepted it) and nothing was logged."""
    hf, data = transformers_run
    saved = _logged_lr(hf)[9]  # the lr the checkpoint's next step would have used: 0.004
    assert saved == pytest.approx(LR * 4 / 10, rel=1e-12)

    t = _resume(model_factory, make_args, data, caplog)  # replan: the new plan from step 8
    assert [_logged_lr(t)[s + 1] for s in range(8, 20)] == [t.lr_scheduler.lr_at(s)[0] for s in range(8, 20)]
    (msg,) = _resume_warnings(caplog)
    new = t.lr_scheduler.lr_at(8)[0]
    assert f"lr at step 8: [{saved:.6g}, {saved:.6g}] -> [{new:.6g}, {new:.6g}]" in msg

    caplog.clear()
    t = _resume(model_factory, make_args, data, caplog, lr_resume_policy="continue")
    lrs = _logged_lr(t)
    for s in range(8, 20):  # continuous, then linear to 0 at the new end
        assert math.isclose(lrs[s + 1], saved * (20 - s) / 12, rel_tol=1e-12, abs_tol=1e-18), s
    (msg,) = _resume_warnings(caplog)
    assert "lr_resume_policy='continue'" in msg and "lr at step 8" in msg

    with pytest.raises(ValueError, match=r"(?s)lr_resume_policy='strict'.*scheduler\.pt.*lr at step 8: "
                                         r"\[0\.004, 0\.004\] -> \[0\.00666667, 0\.00666667\]"):
        _resume(model_factory, make_args, data, caplog, lr_resume_policy="strict")
