"""The Trainer's per-step paths: no per-step module walks, optimizers that update inside backward
(LOMO, layer-wise GaLore / APOLLO), objects in optimizer state, and a verified plan file on resume."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from optsched import Trainer, TrainingArguments
from optsched.trainer import checkpoint as ckpt
from optsched.trainer import trainer as trainer_module
from optsched.trainer.callbacks import TrainerCallback
from optsched.trainer.data import EpochSampler
from optsched.trainer.distributed import DistributedContext
from optsched.trainer.resume import PLAN_NAME, load_plan
from optsched.trainer.trainer import UPDATE_MODES, optimizer_update_mode
from trainer_helpers import TinyRegressor, make_regression_data


class CountingRegressor(TinyRegressor):
    """Counts the whole-model walks the loop could do per step, and records the mode of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"train": 0, "parameters": 0, "zero_grad": 0}
        self.forwards: list[tuple[bool, bool]] = []  # (grad enabled, training)

    def train(self, mode: bool = True):
        if hasattr(self, "calls"):
            self.calls["train"] += 1
        return super().train(mode)

    def parameters(self, recurse: bool = True):
        self.calls["parameters"] += 1
        return super().parameters(recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.calls["zero_grad"] += 1
        super().zero_grad(set_to_none)

    def forward(self, x, labels=None):
        self.forwards.append((torch.is_grad_enabled(), self.training))
        return super().forward(x, labels)


def _args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---- per-step overhead ------------------------------------------------------------------------------


def test_module_walks_do_not_grow_with_the_number_of_steps(tmp_path):
    counts = {}
    for steps in (3, 12):
        torch.manual_seed(0)
        model = CountingRegressor()
        trainer = Trainer(model, _args(tmp_path, max_steps=steps), train_dataset=make_regression_data(32))
        trainer.train()
        counts[steps] = dict(model.calls)
        assert all(training for grad, training in model.forwards if grad)
    assert counts[3] == counts[12]
    assert counts[3]["train"] == 1 and counts[3]["zero_grad"] == 1  # once per train(), never per step


def test_training_mode_is_restored_after_evaluation_and_after_a_callback_switch(tmp_path):
    class EvalAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % 3 == 0:
                model.eval()  # e.g. a callback that probes the model

    class LeavesEval(Trainer):
        def evaluate(self, *args, **kwargs):
            metrics = super().evaluate(*args, **kwargs)
            self.model.eval()  # an override that does not restore the mode
            return metrics

    torch.manual_seed(0)
    model = CountingRegressor()
    args = _args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=2)
    data = make_regression_data(32)
    trainer = LeavesEval(model, args, train_dataset=data, eval_dataset=data[:8], callbacks=[EvalAfterStep()])
    trainer.train()
    training_forwards = [training for grad, training in model.forwards if grad]
    eval_forwards = [training for grad, training in model.forwards if not grad]
    assert len(training_forwards) == 10 and all(training_forwards)
    assert len(eval_forwards) == 5 and not any(eval_forwards)  # 5 evaluations of one batch of 8


def _hand_loop(data, args, steps: int) -> dict[str, torch.Tensor]:
    """The loop the Trainer must equal bit for bit: optsched's optimizer and schedule, its data order."""
    from optsched.optim import create_optimizer
    from optsched.schedules import create_scheduler

    torch.manual_seed(0)
    model = TinyRegressor(dropout=0.1)
    torch.manual_seed(args.seed)
    optimizer = create_optimizer(model, args)
    scheduler = create_scheduler(optimizer, args, steps)
    # its own generator, as the Trainer's loader has: the global RNG (dropout) is not drawn from
    loader = DataLoader(data, batch_size=args.per_device_train_batch_size,
                        sampler=EpochSampler(len(data), seed=args.seed), generator=torch.Generator())
    model.train()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return _weights(model)


def test_the_loop_equals_a_hand_written_one_bit_for_bit(tmp_path):
    data = make_regression_data(64)
    args = _args(tmp_path, max_steps=12, warmup_steps=3, lr_scheduler_type="cosine", weight_decay=0.1)
    torch.manual_seed(0)
    trainer = Trainer(TinyRegressor(dropout=0.1), args, train_dataset=data)
    trainer.train()
    expected = _hand_loop(data, args, 12)
    got = _weights(trainer.model)
    assert [n for n in expected if not torch.equal(got[n], expected[n])] == []


def test_trainable_parameters_outside_the_optimizer_keep_no_stale_gradient(tmp_path):
    """The optimizer holds only ``out``; ``inp`` / ``norm`` are trainable but never stepped. Their gradients
    must be released every step, exactly as if the optimizer held them at lr 0."""
    norms = {}
    for held in ("out only", "all, others at lr 0"):
        torch.manual_seed(0)
        model = TinyRegressor()
        others = [p for n, p in model.named_parameters() if not n.startswith("out.")]
        groups = [{"params": list(model.out.parameters())}]
        if held != "out only":
            groups.append({"params": others, "lr": 0.0})
        optimizer = torch.optim.SGD(groups, lr=0.05)
        trainer = Trainer(model, _args(tmp_path, max_steps=6), train_dataset=make_regression_data(32),
                          optimizers=(optimizer, None))
        trainer.train()
        norms[held] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        assert all(p.grad is None for p in model.parameters())
    assert len(norms["out only"]) == 6
    assert norms["out only"] == norms["all, others at lr 0"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=st.lists(st.booleans(), min_size=6, max_size=6).filter(any))
def test_no_gradient_survives_a_step_whatever_the_optimizer_holds(tmp_path, mask):
    torch.manual_seed(0)
    model = TinyRegressor()
    params = list(model.parameters())
    held = [p for p, keep in zip(params, mask) if keep]
    trainer = Trainer(model, _args(tmp_path, max_steps=2, logging_steps=0, logging_strategy="no"),
                      train_dataset=make_regression_data(8), optimizers=(torch.optim.SGD(held, lr=0.01), None))
    trainer.train()
    assert {id(p) for p in trainer._grad_extras} == {id(p) for p, keep in zip(params, mask) if not keep}
    assert all(p.grad is None for p in params)


# ---- how an optimizer applies its update ----------------------------------------------------------


class _FakeLomo(torch.optim.SGD):
    def fused_backward(self, loss, lr):  # pragma: no cover - detection only
        pass

    def grad_norm(self, loss):  # pragma: no cover - detection only
        pass


class _FakeDummy(torch.optim.SGD):
    optimizer_dict: dict = {}


def _layerwise_optimizer(model):
    from optsched.optim.lowrank import LayerWiseOptimizer

    return LayerWiseOptimizer(list(model.parameters()), optimizer_cls=torch.optim.AdamW, lr=1e-2)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "step"),
        (lambda m: torch.optim.AdamW(m.parameters(), lr=0.1), "step"),
        (lambda m: _FakeLomo(m.parameters(), lr=0.1), "fused_backward"),
        (lambda m: _FakeDummy(m.parameters(), lr=0.1), "layerwise"),
        (_layerwise_optimizer, "layerwise"),
    ],
)
def test_optimizer_update_mode_table(make, expected):
    assert optimizer_update_mode(make(TinyRegressor())) == expected
    assert expected == "step" or expected in UPDATE_MODES


# ---- LOMO -----------------------------------------------------------------------------------------


def test_a_subclass_override_of_the_backward_is_the_one_called(tmp_path):
    class LoggingBackward(Trainer):
        calls = 0

        def _backward_step(self, loss):
            type(self).calls += 1
            super()._backward_step(loss)

    trainer = LoggingBackward(model=TinyRegressor(), args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=2),
                              train_dataset=make_regression_data(64))
    trainer.train()
    assert LoggingBackward.calls == 6  # 3 optimizer steps x 2 micro-batches


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_lomo_trains_through_fused_backward(tmp_path, max_grad_norm, monkeypatch, caplog):
    pytest.importorskip("lomo_optim")
    torch.manual_seed(0)
    args = _args(tmp_path, optim="lomo", learning_rate=0.1, max_steps=24, per_device_train_batch_size=8,
                 max_grad_norm=max_grad_norm, save_strategy="steps", save_steps=24)
    trainer = Trainer(TinyRegressor(), args, train_dataset=make_regression_data(64))
    optimizer = trainer.optimizer
    assert optimizer_update_mode(optimizer) == "fused_backward"
    calls: dict[str, list] = {"fused_backward": [], "grad_norm": []}
    for name in calls:
        original = getattr(optimizer, name)

        def record(*a, _original=original, _name=name):
            calls[_name].append(a[1] if _name == "fused_backward" else None)
            return _original(*a)

        monkeypatch.setattr(optimizer, name, record)
    with caplog.at_level(logging.INFO, logger="optsched.trainer.trainer"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "scheduler.step() before optimizer.step()"
        trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    assert len(calls["fused_backward"]) == 24
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert calls["fused_backward"] == pytest.approx(lrs)  # the scheduled lr of each step
    clipped = max_grad_norm > 0
    assert len(calls["grad_norm"]) == (24 if clipped else 0)
    assert optimizer.clip_grad_norm == (max_grad_norm if clipped else None)
    assert all(("grad_norm" in h) == clipped for h in trainer.state.log_history if "loss" in h)
    assert sum("two backward passes" in r.getMessage() for r in caplog.records) == int(clipped)
    assert ckpt.is_complete_checkpoint(Path(args.output_dir) / "checkpoint-24")


def test_lomo_skips_a_non_finite_step_before_anything_is_applied(tmp_path):
    pytest.importorskip("lomo_optim")
    calls = {"n": 0}

    def loss_fn(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = ((outputs["logits"] - labels) ** 2).mean()
        return loss * float("nan") if calls["n"] == 3 else loss

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(_weights(model))

    torch.manual_seed(0)
    args = _args(tmp_path, optim="lomo", learning_rate=0.05, max_steps=5, max_grad_norm=0.0)
    trainer = Trainer(TinyRegressor(), args, train_dataset=make_regression_data(32), compute_loss_func=loss_fn,
                      callbacks=[Snapshot()])
    trainer.train()
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert same(snapshots[1], snapshots[2])  # step 3: NaN loss, no update
    assert not same(snapshots[2], snapshots[3])  # step 4 updates again
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[-2].get("nonfinite_skipped") == 1


# ---- layer-wise -----------------------------------------------------------------------------------


LAYERWISE = [("galore_adamw_layerwise", "galore_torch", 0.1), ("apollo_adamw_layerwise", "apollo_torch", 3e-2)]


@pytest.mark.parametrize(("optim", "package", "lr"), LAYERWISE)
def test_layerwise_trains_saves_and_resumes_bit_for_bit(tmp_path, optim, package, lr, caplog):
    pytest.importorskip(package)
    data = make_regression_data(64)

    def run(resume=None):
        torch.manual_seed(0)
        args = _args(tmp_path, optim=optim, optim_target_modules=["inp", "out"], learning_rate=lr, max_steps=16,
                     per_device_train_batch_size=8, save_strategy="steps", save_steps=8, max_grad_norm=1.0)
        trainer = Trainer(TinyRegressor(), args, train_dataset=data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # galore-torch's own AdamW deprecation notice
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    with caplog.at_level(logging.INFO, logger="optsched.trainer.trainer"):
        straight = run()
    assert optimizer_update_mode(straight.optimizer) == "layerwise"
    assert sum("is not applied" in r.getMessage() for r in caplog.records) == 1
    losses = _losses(straight)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    assert not any("grad_norm" in h for h in straight.state.log_history)  # nothing left to clip or measure

    resumed = run(resume=str(tmp_path / "out" / "checkpoint-8"))
    a, b = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    inner_a = [o.state_dict()["state"] for o in straight.optimizer.optimizers]
    inner_b = [o.state_dict()["state"] for o in resumed.optimizer.optimizers]
    for sa, sb in zip(inner_a, inner_b):
        for key, value in sa[0].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[0][key]), key
    assert _losses(resumed) == losses  # the checkpoint's history, then the same 8 steps


def test_in_backward_optimizers_refuse_accumulation_and_several_processes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyRegressor()
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2 is not supported: LayerWiseOptimizer"):
        Trainer(model, _args(tmp_path, gradient_accumulation_steps=2), train_dataset=make_regression_data(8),
                optimizers=(_layerwise_optimizer(model), None))
    pytest.importorskip("lomo_optim")
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 is not supported: Lomo .*accepted: 1"):
        Trainer(TinyRegressor(), _args(tmp_path, optim="lomo", gradient_accumulation_steps=4),
                train_dataset=make_regression_data(8))
    monkeypatch.setattr(trainer_module, "init_distributed", lambda use_cpu=False, **_: DistributedContext(0, 0, 2))
    with pytest.raises(ValueError, match=r"2 processes are not supported: Lomo"):
        Trainer(TinyRegressor(), _args(tmp_path, optim="lomo"), train_dataset=make_regression_data(8))


# ---- objects in optimizer state -------------------------------------------------------------------


class Projector:
    """A plain-attribute object like GaLore's projector."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.ortho_matrix = torch.arange(6.0).reshape(2, 3)


def test_objects_in_optimizer_state_round_trip_through_weights_only_load(tmp_path):
    state = {"state": {0: {"step": 3, "projector": Projector(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = tmp_path / "optimizer.pt"
    torch.save(ckpt.encode_objects(state), path)
    loaded = ckpt.safe_torch_load(path, expect_keys=("state", "param_groups"))  # weights_only=True
    trusted = frozenset({Projector.__module__.split(".")[0]})
    back = ckpt.decode_objects(loaded, trusted, str(path))
    projector = back["state"][0]["projector"]
    assert type(projector) is Projector and projector.rank == 2
    assert torch.equal(projector.ortho_matrix, state["state"][0]["projector"].ortho_matrix)
    assert back["param_groups"] == state["param_groups"]


@pytest.mark.parametrize("path", ["os:system", "posixpath:join", f"{__name__}:NoSuchClass", "never_imported_pkg.mod:C"])
def test_objects_outside_the_optimizers_packages_are_refused(path):
    record = {"state": {0: {ckpt.OBJECT_KEY: path, "attributes": {}}}}
    trusted = frozenset({__name__.split(".")[0], "never_imported_pkg"})
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt holds an object of"):
        ckpt.decode_objects(record, trusted, "ckpt/optimizer.pt")


# ---- the plan file is verified before it is read --------------------------------------------------


def _flip_a_digit(text: str) -> str:
    i = next(i for i, c in enumerate(text) if c.isdigit() and c != "0")
    return text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1:]


CORRUPTIONS = {
    "one digit changed (valid JSON, same size)": lambda p: p.write_text(_flip_a_digit(p.read_text())),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "extended": lambda p: p.write_bytes(p.read_bytes() + b" "),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_a_damaged_plan_file_is_refused_on_resume(tmp_path, corrupt):
    data = make_regression_data(16)
    torch.manual_seed(0)
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(TinyRegressor(), args, train_dataset=data).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert load_plan(checkpoint)["format"] == 1  # intact: read as written
    plan = checkpoint / PLAN_NAME
    before = plan.stat().st_size
    CORRUPTIONS[corrupt](plan)
    assert (plan.stat().st_size == before) == corrupt.startswith("one digit")
    with pytest.raises(ckpt.CheckpointError, match=rf"{PLAN_NAME} is damaged"):
        load_plan(checkpoint)
    torch.manual_seed(0)
    trainer = Trainer(TinyRegressor(), args, train_dataset=data)
    with pytest.raises(ckpt.CheckpointError, match=rf"{PLAN_NAME} is damaged"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_plan_without_checksums_is_still_parsed_and_checked(tmp_path):
    """A checkpoint without checksums.json (written by hand, or an older version): JSON errors still name the file."""
    torch.manual_seed(0)
    Trainer(TinyRegressor(), _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=make_regression_data(8)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / ckpt.CHECKSUMS_NAME).unlink()
    assert load_plan(checkpoint)["format"] == 1
    (checkpoint / PLAN_NAME).write_bytes(b"\xff\xfe not json")
    with pytest.raises(ckpt.CheckpointError, match=rf"{PLAN_NAME} is not valid JSON"):
        load_plan(checkpoint)
