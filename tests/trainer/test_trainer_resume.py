"""Resume: bitwise-identical continuation, a changed plan, param groups that no longer match."""

from __future__ import annotations

import logging

import pytest
import torch

from optsched import Trainer
from optsched.trainer.checkpoint import get_last_checkpoint


def _lr_history(trainer, start: int) -> list[tuple[int, float]]:
    return [(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h and h["step"] > start]


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][name]), (k, name)


# 36 samples / batch 4 = 9 batches, GA 2 -> 5 updates per epoch (the last one a partial group of 1 batch);
# 20 steps = 4 epochs. Checkpoint 7 lies mid-epoch (2 updates into epoch 1), checkpoint 10 on an epoch end.
@pytest.mark.parametrize("resume_step", [7, 10])
def test_straight_vs_resumed_is_bitwise_identical(model_factory, regression_data, make_args, resume_step):
    data = regression_data(36)
    args = dict(max_steps=20, gradient_accumulation_steps=2, save_strategy="steps", save_steps=resume_step,
                warmup_steps=3, lr_scheduler_type="cosine", weight_decay=0.01)
    straight = Trainer(model_factory(dropout=0.2), make_args(**args), train_dataset=data)
    straight.train()

    resumed = Trainer(model_factory(dropout=0.2, seed=123), make_args(**args), train_dataset=data)
    ckpt_dir = f"{resumed.args.output_dir}/checkpoint-{resume_step}"
    resumed.train(resume_from_checkpoint=ckpt_dir)

    assert resumed.state.global_step == 20
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    _assert_same_optimizer_state(straight.optimizer, resumed.optimizer)
    assert _lr_history(resumed, resume_step) == _lr_history(straight, resume_step)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > resume_step]  # noqa: E731
    assert losses(resumed) == losses(straight)
    assert resumed.lr_scheduler.state_dict()["last_epoch"] == straight.lr_scheduler.state_dict()["last_epoch"] == 20


@pytest.mark.parametrize("optim", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_torchao_low_bit_adamw_resumes_bitwise(regression_data, make_args, tmp_path, optim):
    # torchao's quantized moments (wrapper tensor subclasses) crashed the first save, and its tensor lr,
    # replaced by a float when the scheduler state loaded, the first step after a resume
    pytest.importorskip("torchao.optim")
    from trainer_helpers import TinyRegressor

    data = regression_data(16, in_features=16)
    args = dict(max_steps=6, per_device_train_batch_size=2, optim=optim, save_strategy="steps", save_steps=3,
                warmup_steps=2, lr_scheduler_type="cosine")
    runs = []
    for resume in (None, "checkpoint-3"):
        torch.manual_seed(0)
        model = TinyRegressor(in_features=16, hidden=256)  # a 256 x 16 weight: torchao quantizes its moments
        trainer = Trainer(model, make_args(**args), train_dataset=data)
        trainer.train(resume_from_checkpoint=resume and f"{trainer.args.output_dir}/{resume}")
        runs.append(trainer)
    straight, resumed = runs
    assert any(type(v) is not torch.Tensor for s in resumed.optimizer.state.values() for v in s.values())
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert _lr_history(resumed, 3) == _lr_history(straight, 3)


def test_resume_true_picks_newest_complete_checkpoint(model_factory, regression_data, make_args):
    data = regression_data(16)
    args = make_args(max_steps=6, save_strategy="steps", save_steps=2)
    Trainer(model_factory(), args, train_dataset=data).train()
    out = args.output_dir
    # a newer but incomplete checkpoint (no trainer_state.json) and a leftover temporary one are ignored
    import os

    os.makedirs(f"{out}/checkpoint-8")
    os.makedirs(f"{out}/.tmp-checkpoint-10")
    assert get_last_checkpoint(out).name == "checkpoint-6"
    t = Trainer(model_factory(), make_args(max_steps=8, save_strategy="no"), train_dataset=data)
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 8
    assert [h["step"] for h in t.state.log_history if "loss" in h][-2:] == [7, 8]


def test_resume_true_without_checkpoint_is_a_clear_error(model_factory, regression_data, make_args):
    t = Trainer(model_factory(), make_args(max_steps=2), train_dataset=regression_data(8))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        t.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        t.train(resume_from_checkpoint=t.args.output_dir + "/checkpoint-99")


def test_changed_schedule_follows_new_plan_without_a_stale_step(model_factory, regression_data, make_args, caplog):
    """The seed's last example: 3 epochs, then resume with num_train_epochs=5."""
    data = regression_data(16)  # 4 updates per epoch
    first = Trainer(model_factory(), make_args(num_train_epochs=3, save_strategy="epoch", warmup_steps=2),
                    train_dataset=data)
    first.train()
    old_lr = first.optimizer.param_groups[0]["lr"]  # linear decay reached 0 at step 12
    assert old_lr == 0.0

    second = Trainer(model_factory(), make_args(num_train_epochs=5, warmup_steps=2), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.resume"):
        second.train(resume_from_checkpoint=f"{first.args.output_dir}/checkpoint-12")
    expected_first_lr = second.lr_scheduler.lr_at(12)[0]
    assert expected_first_lr > 0
    step13 = [h for h in second.state.log_history if h.get("step") == 13 and "loss" in h][0]
    assert step13["learning_rate"] == pytest.approx(expected_first_lr)  # not the stale 0.0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-12 at step 12 with a changed plan" in messages  # which checkpoint: True may pick any
    assert "num_training_steps: 12 -> 20" in messages
    assert f"lr [0, 0] -> [{expected_first_lr:.6g}, {expected_first_lr:.6g}]" in messages
    assert second.state.global_step == 20


def test_frozen_parameter_since_checkpoint_names_group_and_parameter(model_factory, regression_data, make_args):
    data = regression_data(8)
    Trainer(model_factory(), make_args(max_steps=2, save_strategy="steps", save_steps=2), train_dataset=data).train()
    model = model_factory()
    model.inp.bias.requires_grad_(False)
    t = Trainer(model, make_args(max_steps=4), train_dataset=data)
    with pytest.raises(ValueError) as err:
        t.train(resume_from_checkpoint=f"{t.args.output_dir}/checkpoint-2")
    msg = str(err.value)
    assert "'no_decay'" in msg and "inp.bias" in msg and "frozen or removed" in msg


def test_iterable_dataset_resume_is_exact(model_factory, regression_data, make_args):
    items = regression_data(10)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(items)

    # 10 items / batch 4 -> 3 batches per pass (last one of 2); GA 2 -> 2 updates per pass
    args = dict(max_steps=7, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
    straight = Trainer(model_factory(), make_args(**args), train_dataset=Stream())
    straight.train()
    resumed = Trainer(model_factory(seed=5), make_args(**args), train_dataset=Stream())
    resumed.train(resume_from_checkpoint=f"{resumed.args.output_dir}/checkpoint-3")
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_fused_adafactor_resumes_bitwise(model_factory, regression_data, make_args):
    """optim="adafactor" with optim_args="fused=True" (the C++ kernel): a resume continues bit for bit."""
    from optsched.optim.adafactor_fused import missing_build_tool

    if missing_build_tool() is not None:
        pytest.skip(f"Adafactor(fused=True) cannot be built here: {missing_build_tool()}")
    data = regression_data(16)
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, optim="adafactor", optim_args="fused=True",
                learning_rate=1e-2, weight_decay=0.01)
    straight = Trainer(model_factory(), make_args(**args), train_dataset=data)
    straight.train()
    assert all(group["fused"] for group in straight.optimizer.param_groups)
    resumed = Trainer(model_factory(seed=123), make_args(**args), train_dataset=data)
    resumed.train(resume_from_checkpoint=f"{resumed.args.output_dir}/checkpoint-4")
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():  # "step" and (without scale_parameter) "RMS" are ints
            other = b["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (k, name)


def test_grokadamw_resumes_bitwise(model_factory, regression_data, make_args):
    """grokadamw keeps its state inside the param groups, keyed by the parameters: saved as it is, a
    resume starts from zeroed moments (in transformers too). optsched saves it by index."""
    pytest.importorskip("grokadamw")
    data = regression_data(16)
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, optim="grokadamw", learning_rate=1e-2)
    straight = Trainer(model_factory(), make_args(**args), train_dataset=data)
    straight.train()
    resumed = Trainer(model_factory(seed=123), make_args(**args), train_dataset=data)
    resumed.train(resume_from_checkpoint=f"{resumed.args.output_dir}/checkpoint-4")
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) == len(list(straight.model.parameters()))
    for k in a:
        assert a[k]["step"] == b[k]["step"] == 8  # a Python int in grokadamw's state
        assert all(torch.equal(a[k][name], b[k][name]) for name in ("exp_avg", "exp_avg_sq", "grok_ema")), k


def _as_a_triton_run_saves_it(checkpoint, optimizer) -> None:
    """Rewrite ``checkpoint``'s optimizer.pt and plan as a CUDA run with Triton writes them: ``triton=True``
    in every group, and the scratch tensors Triton's kernel keeps per parameter."""
    import json

    from optsched.trainer import checkpoint as ckpt

    ckpt.load_optimizer_state(optimizer, checkpoint)
    for group in optimizer.param_groups:
        group["triton"] = True
    for state in optimizer.state.values():
        state.update(kahan_comp=torch.zeros(1, dtype=torch.uint8), mean_square=torch.zeros(1))
    ckpt.save_optimizer_state(optimizer, checkpoint)
    plan_file = checkpoint / ckpt.PLAN_NAME
    plan = json.loads(plan_file.read_text())
    for group in plan["param_groups"]:
        group["settings"]["triton"] = True
    plan_file.write_text(json.dumps(plan))
    ckpt.write_checksums(checkpoint)


@pytest.mark.parametrize("policy", ["replan", "strict"])
@pytest.mark.parametrize("saved_on", ["cpu", "triton"])
def test_stable_adamw_resumes_bitwise(model_factory, regression_data, make_args, caplog, policy, saved_on):
    """optimi's groups carry ``setup`` and ``triton``, which a new optimizer holds unset: as plan settings
    they made every resume a changed plan ('strict' refused it), and 'replan' set setup=False again, so
    the next step restarted the group's step count from 0. A checkpoint of a run where Triton ran
    (``triton=True``) failed at the first step on the CPU."""
    pytest.importorskip("optimi")
    data = regression_data(16)
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, optim="stable_adamw", learning_rate=1e-2,
                weight_decay=0.01, lr_resume_policy=policy)
    straight = Trainer(model_factory(), make_args(**args), train_dataset=data)
    straight.train()
    resumed = Trainer(model_factory(seed=123), make_args(**args), train_dataset=data)
    checkpoint = resumed.args.output_dir + "/checkpoint-4"
    if saved_on == "triton":
        from pathlib import Path

        _as_a_triton_run_saves_it(Path(checkpoint), Trainer(model_factory(), make_args(**args)).optimizer)
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.resume"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # the plan is unchanged
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert [int(g["step"]) for g in resumed.optimizer.param_groups] == [8, 8]
    assert [g["triton"] for g in resumed.optimizer.param_groups] == [False, False]


def test_a_resume_by_another_number_of_processes_says_it_is_not_exact(model_factory, regression_data, make_args, caplog):
    # a checkpoint of 2 processes (rng_state_0.pth, rng_state_1.pth) resumed by one: each step's samples
    # are split anew and the RNG states are per process. 4 processes resumed by 2 said nothing at all
    # (each found its RNG file), 2 by 1 only that dropout masks would differ
    import os
    import shutil
    from pathlib import Path

    from optsched.trainer import checkpoint as ckpt

    data = regression_data(16)
    Trainer(model_factory(), make_args(max_steps=2, save_strategy="steps", save_steps=2), train_dataset=data).train()
    t = Trainer(model_factory(), make_args(max_steps=4, save_strategy="steps", save_steps=2), train_dataset=data)
    path = Path(t.args.output_dir) / "checkpoint-2"
    assert ckpt.saved_process_count(path) == 1
    shutil.copy(path / "rng_state.pth", path / "rng_state_0.pth")
    os.replace(path / "rng_state.pth", path / "rng_state_1.pth")
    ckpt.write_checksums(path)
    assert ckpt.saved_process_count(path) == 2
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.checkpointing"):
        t.train(resume_from_checkpoint=str(path))
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "optsched.trainer.checkpointing")
    assert "was trained with processes=2 and is resumed with processes=1: the resume is not exact" in messages
    assert "dropout masks differ" in messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.checkpointing"):
        Trainer(model_factory(), make_args(max_steps=6), train_dataset=data).train(resume_from_checkpoint=True)
    assert not [r for r in caplog.records if "is resumed with" in r.getMessage()]  # checkpoint-4: one process, as now


@pytest.mark.parametrize(("field", "value"), [("per_device_train_batch_size", 2), ("gradient_accumulation_steps", 2)])
def test_a_resume_with_another_batch_per_step_says_it_is_not_exact(model_factory, regression_data, make_args, caplog,
                                                                     field, value):
    # halving the batch recomputed the epoch (2.0 at step 8, then 1.125 at step 9) and trained epochs again,
    # without a word
    data = regression_data(16)
    Trainer(model_factory(), make_args(max_steps=2, save_strategy="steps", save_steps=2), train_dataset=data).train()
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.checkpointing"):
        Trainer(model_factory(), make_args(max_steps=4, **{field: value}), train_dataset=data).train(
            resume_from_checkpoint=True)
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "optsched.trainer.checkpointing")
    saved = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}[field]
    assert f"was trained with {field}={saved} and is resumed with {field}={value}: the resume is not exact" in messages
    assert "samples are seen again or skipped" in messages and "dropout" not in messages


@pytest.mark.parametrize("compiler", ["user", "torch_compile"])
def test_a_checkpoint_moves_between_the_compiled_and_the_uncompiled_model(model_factory, regression_data, make_args,
                                                                          tmp_path, compiler):
    # A torch.compile'd model saved its weights as "_orig_mod.<name>" and its groups' param_names so:
    # the uncompiled model could not load the checkpoint ("missing in the file"), nor the reverse. The model
    # is compiled by the user, or by the Trainer (torch_compile): either way, with dropout, every run is the
    # uncompiled one bitwise
    from safetensors.torch import load_file

    data = regression_data(16)
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=0.1, lr_scheduler_type="cosine",
                    param_rules=[{"params": "out.*", "lr_mult": 0.5}])
    runs = {}
    for label, compiled, resume in [("plain", False, None), ("compiled", True, None),
                                    ("compiled_from_plain", True, "plain"), ("plain_from_compiled", False, "compiled")]:
        model = model_factory(dropout=0.2)
        fields = {"torch_compile_backend": "eager"} if compiled and compiler == "torch_compile" else {}
        if compiled and compiler == "user":
            model = torch.compile(model, backend="eager")
        trainer = Trainer(model, make_args(output_dir=str(tmp_path / label), **settings, **fields), train_dataset=data)
        trainer.train(resume_from_checkpoint=resume and str(tmp_path / resume / "checkpoint-3"))
        assert (trainer.model_wrapped is not trainer.model) is bool(fields)  # the Trainer compiled a wrapper
        runs[label] = trainer
    assert set(load_file(tmp_path / "compiled" / "checkpoint-3" / "model.safetensors")) == {
        name for name, _ in model_factory().named_parameters()}
    straight = runs["plain"]
    for label in ("compiled", "compiled_from_plain", "plain_from_compiled"):
        for (n, p), (_, q) in zip(straight.model.named_parameters(), runs[label].model.named_parameters()):
            assert torch.equal(p, q), (label, n)
        _assert_same_optimizer_state(straight.optimizer, runs[label].optimizer)
