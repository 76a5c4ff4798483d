"""label_smoothing_factor: transformers' LabelSmoother on the model's logits (optsched.trainer.label_smoothing)."""

from __future__ import annotations

import logging

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.label_smoothing import LabelSmoother, make_label_smoother
from trainer_helpers import PlainRegressor, make_trainer, masked_lm_data, tiny_bert, tiny_llama

transformers = pytest.importorskip("transformers")


def _classification_data(n=13):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
            for _ in range(n)]


@pytest.mark.parametrize(
    ("make", "data", "ga"),
    [(tiny_llama, masked_lm_data, 2), (tiny_bert, _classification_data, 3)],
    ids=["causal-lm-masked-labels", "sequence-classification"],
)
def test_smoothed_training_is_transformers_trainer_bitwise(tmp_path, make, data, ga):
    runs = {}
    for name in ("optsched", "hf"):
        kw = dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=ga, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                  disable_tqdm=True, use_cpu=True, seed=0, label_smoothing_factor=0.1)
        torch.manual_seed(0)
        model = make()
        trainer = make_trainer(name, model, data(), **kw)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (model.state_dict(), losses)
    (ours, our_losses), (hf, hf_losses) = runs["optsched"], runs["hf"]
    assert all(torch.equal(ours[k], v) for k, v in hf.items())
    assert our_losses == hf_losses


def test_smoothing_changes_the_loss_from_the_models_own():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, -100, 1])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(LabelSmoother(0.0)({"logits": logits}, labels), plain)
    smoothed = LabelSmoother(0.1)((logits,), labels)
    uniform = -torch.log_softmax(logits, -1)[labels != -100].mean()
    torch.testing.assert_close(smoothed, 0.9 * plain + 0.1 * uniform)
    # with the step's count (6 labels over its micro-batches), the sums are divided by it instead
    torch.testing.assert_close(LabelSmoother(0.1)((logits,), labels, num_items_in_batch=6), smoothed * 3 / 6)


def test_multi_label_models_are_trained_without_smoothing(caplog):
    model = tiny_bert()
    model.config.problem_type = "multi_label_classification"
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.label_smoothing"):
        assert make_label_smoother(model, 0.1) is None
    assert "multi-label classification" in caplog.text
    assert make_label_smoother(tiny_bert(), 0.0) is None


class _NoLogits(PlainRegressor):
    def forward(self, x, labels=None):
        return {"prediction": self.linear(x)}


def test_a_model_without_logits_is_refused_clearly(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, save_strategy="no",
                             label_smoothing_factor=0.1)
    trainer = Trainer(_NoLogits(), args, train_dataset=[{"x": torch.ones(3), "labels": torch.tensor(1)}] * 4)
    with pytest.raises(ValueError, match=r"label_smoothing_factor > 0 smooths the model's logits, but its output "
                                         r"\(dict\) has none"):
        trainer.train()


def test_label_smoothing_factor_is_checked():
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        TrainingArguments(label_smoothing_factor=-0.1)
    assert TrainingArguments().label_smoothing_factor == 0.0
