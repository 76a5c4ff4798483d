"""debug="underflow_overflow" (trainer.overflow_debug): the first NaN / inf in a forward stops training with
transformers' report of the last frames."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from optsched import Trainer, TrainerCallback, TrainingArguments
from optsched.trainer.overflow_debug import DebugUnderflowOverflow, UnderflowOverflowError


class Stack(nn.Module):
    """Linear -> (GELU, Identity) tuple -> Linear; a HF-style dict output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.act, self.out = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1)

    def forward(self, x, labels=None):
        h = self.act(self.inp(x))
        pred = self.out(h).squeeze(-1)
        return {"loss": ((pred - labels) ** 2).mean(), "logits": pred}


def overflowing_data(bad: int = 13) -> list[dict[str, torch.Tensor]]:
    """16 samples; sample ``bad`` holds 3e38, which the first Linear takes past float32's largest value."""
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "labels": torch.tensor(1.0)} for _ in range(16)]
    data[bad]["x"] = torch.full((4,), 3e38)
    return data


def _report_from(text: str) -> str:
    """The report, from "Detected inf/nan" on, each line's right spaces dropped."""
    start = text.index("Detected inf/nan")
    return "\n".join(line.rstrip() for line in text[start:].strip().splitlines())


def test_the_report_and_the_stop_are_transformers(tmp_path, capsys, caplog):
    transformers = pytest.importorskip("transformers")
    model, data = Stack(), overflowing_data()
    fields = dict(per_device_train_batch_size=4, max_steps=8, save_strategy="no", use_cpu=True, seed=0,
                  disable_tqdm=True, report_to="none", debug="underflow_overflow")
    theirs = transformers.Trainer(copy.deepcopy(model), transformers.TrainingArguments(
        output_dir=str(tmp_path / "h"), **fields), train_dataset=data)
    with pytest.raises(ValueError, match="DebugUnderflowOverflow: inf/nan detected"):
        theirs.train()
    printed = capsys.readouterr().out
    ours = Trainer(copy.deepcopy(model), TrainingArguments(output_dir=str(tmp_path / "o"), **fields),
                   train_dataset=data)
    with caplog.at_level(logging.ERROR, logger="optsched"), pytest.raises(
            UnderflowOverflowError, match=r"inf/nan detected during batch_number=\d \(output has infs\)"):
        ours.train()
    assert isinstance(UnderflowOverflowError("x"), ValueError)  # what transformers raises
    logged = caplog.records[-1].getMessage()
    assert _report_from(logged) == _report_from(printed)
    assert "inp Linear" in logged and " inf output" in logged
    assert ours.state.global_step == theirs.state.global_step  # the same step stopped
    # the hooks came off with train(): the model evaluates and trains on without them
    assert not any(m._forward_hooks for m in ours.model.modules())


def test_frames_keep_the_last_ones_and_name_every_value():
    model = Stack()
    with DebugUnderflowOverflow(model, max_frames_to_save=2) as debug:
        model(torch.ones(2, 4), labels=torch.ones(2))
        assert len(debug.frames) == 2 and debug.batch_number == 1
        last = debug.frames[-1].splitlines()
        assert last[0].strip() == "Stack" and [line.split()[-1] for line in last[1:]] == ["input[0]", "output"]
        assert debug.frames[0].splitlines()[0].strip() == "out Linear"
        with pytest.raises(UnderflowOverflowError, match=r"batch_number=1 \(input\[0\] has nans; output has nans\)"):
            model(torch.full((2, 4), float("nan")), labels=torch.ones(2))
    assert not any(m._forward_hooks for m in model.modules())


class HooksSeen(TrainerCallback):
    """Whether any module of the model has a forward hook, at each step's end."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(any(m._forward_hooks for m in self.model.modules()))


@pytest.mark.parametrize("debug", ["", "underflow_overflow"])
def test_hooks_are_on_only_during_train_and_only_when_asked_for(tmp_path, debug):
    model, data = Stack(), overflowing_data()[:12]  # sample 13 left out: nothing overflows
    watch = HooksSeen(model)
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                               save_strategy="no", use_cpu=True, disable_tqdm=True, debug=debug),
                      train_dataset=data, callbacks=[watch])
    trainer.train()
    assert watch.seen == [bool(debug)] * 3
    assert not any(m._forward_hooks for m in model.modules())


def test_without_the_option_an_overflowing_step_is_skipped_not_an_error(tmp_path):
    trainer = Trainer(Stack(), TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                                 save_strategy="no", use_cpu=True, disable_tqdm=True),
                      train_dataset=overflowing_data())
    trainer.train()
    assert trainer.state.global_step == 4 and trainer._nonfinite.skipped_total == 1


@pytest.mark.parametrize(("value", "error", "message"), [
    ("tpu_metrics_debug", ValueError, "optsched does not run on TPUs"),
    ("overflow", ValueError, "Did you mean 'underflow_overflow'"),
    (3, TypeError, "debug must be a space-separated string or a list"),
])
def test_bad_debug_options_are_refused(value, error, message):
    with pytest.raises(error, match=message):
        TrainingArguments(debug=value)
    assert TrainingArguments(debug="underflow_overflow underflow_overflow").debug == ["underflow_overflow"]
    assert TrainingArguments(debug=None).debug == TrainingArguments().debug == []


def test_masks_and_empty_tensors_are_framed_not_raised():
    class Masked(nn.Module):
        def forward(self, x, mask, empty):
            return x * mask

    model = Masked()
    with DebugUnderflowOverflow(model) as debug:
        model(torch.ones(3), torch.tensor([True, False, True]), torch.ones(0))
    lines = debug.frames[-1].splitlines()
    assert lines[-3].split() == ["0.00e+00", "1.00e+00", "input[1]"]
    assert lines[-2].split() == ["empty", "input[2]"]


def test_a_transformers_model_trains_under_the_hooks_as_without(tmp_path):
    pytest.importorskip("transformers")
    from trainer_helpers import masked_lm_data, tiny_gpt2

    weights = {}
    for debug in ("", "underflow_overflow"):
        torch.manual_seed(0)
        trainer = Trainer(tiny_gpt2(), TrainingArguments(output_dir=str(tmp_path / (debug or "plain")), max_steps=3,
                                                         per_device_train_batch_size=4, save_strategy="no",
                                                         use_cpu=True, disable_tqdm=True, debug=debug),
                          train_dataset=masked_lm_data())
        trainer.train()
        weights[debug] = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[""], weights["underflow_overflow"]))
