"""fp16_full_eval / bf16_full_eval (optsched.trainer.full_eval): evaluate() / predict() outside train() run the
model cast, as transformers' Trainer does, and the float32 weights come back unrounded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trainer_helpers import make_trainer, masked_lm_data, tiny_bert, tiny_llama

transformers = pytest.importorskip("transformers")

EVAL = dict(per_device_eval_batch_size=4, use_cpu=True, disable_tqdm=True)
DTYPES = {"bf16_full_eval": torch.bfloat16, "fp16_full_eval": torch.float16}


def _classification_data(n: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


MODELS = {"llama": (tiny_llama, masked_lm_data), "bert": (tiny_bert, _classification_data)}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("flag", list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_evaluate_and_predict_match_transformers_cast_model(tmp_path, model_name, flag):
    # fp16 runs on the CPU as in transformers (no gradient scaling to evaluate)
    make_model, make_data = MODELS[model_name]
    data = make_data(6)
    torch.manual_seed(0)
    model = make_model()
    ours, theirs, plain = (
        make_trainer(kind, copy.deepcopy(model), None, eval_dataset=data, output_dir=str(tmp_path / kind), **EVAL,
                     **({} if kind == "plain" else {flag: True}))
        for kind in ("optsched", "hf", "plain"))
    m_ours, m_theirs, m_plain = ours.evaluate(), theirs.evaluate(), plain.evaluate()
    # a float16 loss (BERT's; Llama's is computed in float32): transformers averages it in a float16 array,
    # its eval_loss rounded to float16; optsched's is the float64 mean
    rel = 2**-11 if flag == "fp16_full_eval" else 1e-6
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=rel)
    assert m_ours["eval_loss"] != pytest.approx(m_plain["eval_loss"], rel=1e-6)  # the cast shows
    p_ours, p_theirs, p_plain = (t.predict(data) for t in (ours, theirs, plain))
    # bfloat16 logits come back as float32 (numpy has none), float16 ones as float16 (transformers' rules)
    assert p_ours.predictions.dtype == p_theirs.predictions.dtype == (np.float16 if flag == "fp16_full_eval" else np.float32)
    np.testing.assert_array_equal(p_ours.predictions, p_theirs.predictions)
    assert not np.array_equal(p_ours.predictions.astype(np.float32), p_plain.predictions)
    assert p_ours.metrics["test_loss"] == pytest.approx(p_theirs.metrics["test_loss"], rel=rel)


def test_the_float32_weights_come_back_unrounded_and_training_goes_on_as_without_the_evaluation(tmp_path):
    data = masked_lm_data(8)
    fields = dict(EVAL, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                  bf16_full_eval=True)
    torch.manual_seed(0)
    model = tiny_llama()
    trainers = [make_trainer(kind, copy.deepcopy(model), data, eval_dataset=data, output_dir=str(tmp_path / str(i)),
                             **fields) for i, kind in enumerate(("optsched", "optsched", "hf"))]
    evaluated, untouched, theirs = trainers
    params = list(evaluated.model.parameters())
    before = _snapshot(evaluated.model)
    evaluated.evaluate()
    evaluated.predict(data)
    after = _snapshot(evaluated.model)
    assert list(evaluated.model.parameters()) == params  # the same Parameters: the optimizer's references hold
    for name, value in before.items():  # parameters and buffers (the rotary inv_freq) as they were, bit for bit
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    evaluated.train()
    untouched.train()
    for (name, a), b in zip(evaluated.model.named_parameters(), untouched.model.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    # transformers (on purpose not followed): its model stays cast after evaluate(), and trains in bfloat16
    theirs.evaluate()
    assert {p.dtype for p in theirs.model.parameters()} == {torch.bfloat16}


def test_evaluations_during_training_are_not_cast(tmp_path):
    # transformers' rule (is_in_train): eval_loss during train() is the float32 one, with or without the flag
    data = masked_lm_data(8)
    fields = dict(EVAL, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                  eval_strategy="steps", eval_steps=1)
    torch.manual_seed(0)
    model = tiny_llama()
    losses = []
    for i, (kind, flag) in enumerate((("optsched", True), ("optsched", False), ("hf", True))):
        trainer = make_trainer(kind, copy.deepcopy(model), data, eval_dataset=data, output_dir=str(tmp_path / str(i)),
                               bf16_full_eval=flag, **fields)
        trainer.train()
        assert not trainer.is_in_train
        losses.append([h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)


def test_a_schedule_free_optimizer_finds_its_own_weights_back(tmp_path):
    # its eval() / train() switch moves the weights in place around the evaluation: the cast comes and goes
    # inside it, so train() starts again from the float32 weights eval() left (as without the flag)
    data = masked_lm_data(8)
    torch.manual_seed(0)
    model = tiny_llama()
    weights = []
    for flag in (True, False):
        trainer = make_trainer("optsched", copy.deepcopy(model), data, eval_dataset=data, **EVAL, max_steps=2,
                               per_device_train_batch_size=4, optim="schedule_free_adamw", lr_scheduler_type="constant",
                               learning_rate=1e-2, save_strategy="no", output_dir=str(tmp_path), bf16_full_eval=flag)
        trainer.train()
        trainer.evaluate()
        weights.append(_snapshot(trainer.model))
    for name, value in weights[1].items():
        assert torch.equal(weights[0][name], value), name
