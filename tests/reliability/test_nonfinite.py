"""Non-finite loss / gradients: the step is skipped (optimizer and scheduler), counted and logged; too
many in a row stop training; NaN / inf weights are never saved."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _helpers import Tiny, make_args, make_data, weights

from optsched.trainer import Trainer, TrainerCallback
from optsched.trainer import checkpoint as ckpt
from optsched.trainer.nonfinite import NonFiniteError, NonFiniteGuard, check_finite_weights, grad_total_norm


class _Watch(TrainerCallback):
    """Record each step's weights and the scheduler's step count after the step."""

    def __init__(self) -> None:
        self.trainer = None
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.sched_steps: dict[int, int] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = weights(self.trainer.model)
        self.sched_steps[state.global_step] = self.trainer.lr_scheduler.last_epoch


def _trainer(tmp_path, poison: set[int], **kw) -> tuple[Trainer, _Watch]:
    model = Tiny()
    model.poison_steps = poison  # forward call numbers (= steps here) whose loss is NaN
    watch = _Watch()
    t = Trainer(model, make_args(str(tmp_path / "out"), **kw), train_dataset=make_data(), callbacks=[watch])
    watch.trainer = t
    return t, watch


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, caplog, max_grad_norm):
    t, watch = _trainer(tmp_path, {3}, max_steps=6, max_grad_norm=max_grad_norm)
    with caplog.at_level(logging.WARNING, logger="optsched"):
        result = t.train()
    assert result.global_step == 6
    for name in watch.after[3]:  # step 3 changed nothing
        assert torch.equal(watch.after[3][name], watch.after[2][name])
        assert not torch.equal(watch.after[4][name], watch.after[3][name])
    # the scheduler skipped step 3 too: it is one step behind the global step afterwards
    assert [watch.sched_steps[s] for s in range(1, 7)] == [1, 2, 2, 3, 4, 5]
    assert t._nonfinite.skipped_total == 1
    assert any("step 3: non-finite" in r.getMessage() for r in caplog.records)
    logged = [h for h in t.state.log_history if "learning_rate" in h]
    assert [h.get("nonfinite_skipped", 0) for h in logged] == [0, 0, 1, 1, 1, 1]
    assert ["loss" in h for h in logged] == [True, True, False, True, True, True]  # step 3 measured none
    losses = [h["loss"] for h in logged if "loss" in h]
    assert all(math.isfinite(v) for v in losses)  # the NaN never reaches the logged loss
    # train_loss is the mean over the 5 applied steps, not a sum over 6 with the skipped one as 0
    assert result.training_loss == pytest.approx(sum(losses) / 5, rel=1e-6)


def test_without_the_logging_filter_the_skipped_steps_nan_is_logged_and_the_step_still_skipped(tmp_path):
    # logging_nan_inf_filter=False (transformers: every step's loss counts): the NaN shows in 'loss' and
    # train_loss; the step is skipped all the same, so the weights stay finite
    t, watch = _trainer(tmp_path, {3}, max_steps=6, logging_nan_inf_filter=False)
    result = t.train()
    logged = [h for h in t.state.log_history if "learning_rate" in h]
    assert [math.isnan(h["loss"]) for h in logged] == [False, False, True, False, False, False]
    assert math.isnan(result.training_loss)
    assert [h.get("nonfinite_skipped", 0) for h in logged] == [0, 0, 1, 1, 1, 1]
    for name in watch.after[3]:
        assert torch.equal(watch.after[3][name], watch.after[2][name])
        assert torch.isfinite(watch.after[6][name]).all()


def test_the_logged_loss_is_the_mean_of_the_applied_steps_of_its_window(tmp_path):
    every, _ = _trainer(tmp_path / "every", {3}, max_steps=6)
    every.train()
    per_step = {h["step"]: h["loss"] for h in every.state.log_history if "loss" in h and "step" in h}
    pairs, _ = _trainer(tmp_path / "pairs", {3}, max_steps=6, logging_steps=2)
    pairs.train()
    logged = {h["step"]: h["loss"] for h in pairs.state.log_history if "loss" in h and "step" in h}
    assert logged[2] == pytest.approx((per_step[1] + per_step[2]) / 2, rel=1e-6)
    assert logged[4] == pytest.approx(per_step[4], rel=1e-6)  # step 3 skipped: left out, not counted as 0


def test_too_many_in_a_row_stop_with_an_error_and_checkpoints_stay_finite(tmp_path):
    t, _ = _trainer(tmp_path, {3, 4, 5, 6}, max_steps=10, max_consecutive_nonfinite=2,
                    save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteError, match=r"step 5: .*3 consecutive steps.*max_consecutive_nonfinite=2"):
        t.train()
    found = [p.name for p in ckpt.list_checkpoints(tmp_path / "out")]
    assert found == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    for name in found:
        model = Tiny(seed=3)
        ckpt.load_model_weights(model, tmp_path / "out" / name)
        check_finite_weights(model)  # raises on NaN / inf


def test_zero_tolerance_stops_at_the_first(tmp_path):
    t, _ = _trainer(tmp_path, {2}, max_steps=5, max_consecutive_nonfinite=0)
    with pytest.raises(NonFiniteError, match="step 2"):
        t.train()


def test_a_finite_step_resets_the_run(tmp_path):
    t, _ = _trainer(tmp_path, {2, 3, 5, 6}, max_steps=8, max_consecutive_nonfinite=2)
    assert t.train().global_step == 8 and t._nonfinite.skipped_total == 4


class _BlowUp(TrainerCallback):
    def __init__(self, model, at: int, value: float) -> None:
        self.model, self.at, self.value = model, at, value

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                self.model.b.weight[0, 0] = self.value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_inf_are_never_saved(tmp_path, value):
    model = Tiny()
    t = Trainer(model, make_args(str(tmp_path / "out"), max_steps=6, save_strategy="steps", save_steps=2),
                train_dataset=make_data(), callbacks=[_BlowUp(model, 3, value)])
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*checkpoint-4.*b\.weight"):
        t.train()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("checkpoint", ".tmp"))] == ["checkpoint-2"]
    with pytest.raises(NonFiniteError, match="model.safetensors"):
        t.save_model(tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_guard_and_norm_units():
    g = NonFiniteGuard(max_consecutive=1)
    assert g.should_skip(1.0, None, 1) is False
    assert g.should_skip(float("inf"), 2.0, 2) is True
    with pytest.raises(NonFiniteError, match="step 3"):
        g.should_skip(1.0, float("nan"), 3)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(grad_total_norm([p])) == 5.0
    p.grad[2] = float("nan")
    assert math.isnan(float(grad_total_norm([p])))
    assert float(grad_total_norm([torch.nn.Parameter(torch.zeros(1))])) == 0.0
