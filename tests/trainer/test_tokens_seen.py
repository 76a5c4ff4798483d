"""include_num_input_tokens_seen (optsched.trainer.tokens_seen) and eval_on_start: transformers' Trainer's
counts, logs and evaluation at step 0."""

from __future__ import annotations

import logging

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.tokens_seen import TokenCounter
from trainer_helpers import PlainRegressor, make_trainer, padded_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")


def _fields(tmp_path, name, **extra):
    return dict(output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                use_cpu=True, seed=0, **extra)


@pytest.mark.parametrize("mode", ["all", "non_padding", True])
def test_token_counts_and_logs_are_transformers_trainers(tmp_path, mode):
    runs = {}
    for name in ("optsched", "hf"):
        torch.manual_seed(0)
        trainer = make_trainer(name, tiny_llama(), padded_lm_data(),
                               **_fields(tmp_path, name, include_num_input_tokens_seen=mode))
        output = trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        runs[name] = (trainer.state.num_input_tokens_seen, output.metrics["num_input_tokens_seen"],
                      [(e["step"], e["num_input_tokens_seen"]) for e in logs],
                      [sorted(e) for e in logs])
    assert runs["optsched"] == runs["hf"]
    total, _, per_log, keys = runs["optsched"]
    # 11 examples x 2 epochs: every element (176) or the mask's ones; growing by a different count per step
    data = padded_lm_data()
    expected = 2 * (sum(int(d["attention_mask"].sum()) for d in data) if mode == "non_padding" else 11 * 8)
    assert total == expected
    assert len({b - a for (_, a), (_, b) in zip(per_log, per_log[1:])}) > 1
    assert "train_tokens_per_second" in keys[0] and "train_runtime" in keys[0]


def test_the_count_survives_a_resume(tmp_path):
    fields = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, save_steps=3, disable_tqdm=True, use_cpu=True, seed=0,
                  include_num_input_tokens_seen="non_padding")
    torch.manual_seed(0)
    straight = Trainer(tiny_llama(), TrainingArguments(**fields), train_dataset=padded_lm_data())
    straight.train()
    torch.manual_seed(0)
    resumed = Trainer(tiny_llama(), TrainingArguments(**fields), train_dataset=padded_lm_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert 0 < resumed.state.num_input_tokens_seen == straight.state.num_input_tokens_seen


def test_the_count_is_off_by_default(tmp_path):
    trainer = make_trainer("optsched", tiny_llama(), padded_lm_data(), **_fields(tmp_path, "off"))
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 0
    assert not any("num_input_tokens_seen" in entry for entry in trainer.state.log_history)


def test_counter_without_the_main_input_or_a_mask_warns_once(caplog):
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.tokens_seen"):
        counter = TokenCounter("non_padding", "input_ids")
        assert [counter.count(batch) for _ in range(3)] == [10, 10, 10]  # every element, padding included
        missing = TokenCounter("all", "pixel_values")
        assert [missing.count(batch), missing.count((batch["input_ids"],))] == [0, 0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "no attention_mask" in messages[0] and "'pixel_values'" in messages[1]
    assert TokenCounter("non_padding", "input_ids").count(
        {"input_ids": batch["input_ids"], "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])}) == 3


def test_include_num_input_tokens_seen_is_checked():
    assert TrainingArguments(include_num_input_tokens_seen=False).include_num_input_tokens_seen == "no"
    with pytest.raises(ValueError, match=r"include_num_input_tokens_seen='yes'.*all, no, non_padding"):
        TrainingArguments(include_num_input_tokens_seen="yes")
    with pytest.raises(TypeError, match="eval_on_start"):
        TrainingArguments(eval_on_start="yes")


def test_eval_on_start_evaluates_before_the_first_step_as_transformers(tmp_path):
    data = [{"x": torch.randn(3), "labels": torch.randn(())} for _ in range(6)]
    events = {}
    for name in ("optsched", "hf"):
        torch.manual_seed(0)
        trainer = make_trainer(name, PlainRegressor(), data, eval_dataset=data[:4],
                               **_fields(tmp_path, name, eval_on_start=True, eval_strategy="epoch"))
        trainer.train()
        events[name] = [(e["step"], "eval_loss" in e) for e in trainer.state.log_history if "eval_loss" in e or "loss" in e]
        first_eval = next(e for e in trainer.state.log_history if "eval_loss" in e)
        events[name].append(round(first_eval["eval_loss"], 6))
    assert events["optsched"] == events["hf"]
    assert events["optsched"][0] == (0, True)


def test_eval_on_start_without_an_eval_dataset_fails_before_training(tmp_path):
    data = [{"x": torch.randn(3), "labels": torch.randn(())} for _ in range(6)]
    trainer = make_trainer("optsched", PlainRegressor(), data, **_fields(tmp_path, "noeval", eval_on_start=True))
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.train()
    assert trainer.state.global_step == 0
