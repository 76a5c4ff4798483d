"""num_items_in_batch: which models get it, the count, and training parity with transformers' Trainer."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.loss_items import count_label_items, loss_shifts_labels, model_accepts_loss_kwargs
from trainer_helpers import (
    PeftStyleWrapper,
    PlainRegressor,
    make_trainer,
    masked_lm_data,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

transformers = pytest.importorskip("transformers")


_Plain = PlainRegressor


class _TakesKwargs(_Plain):
    """Takes **kwargs and ignores them: its loss is a mean, whatever num_items_in_batch says."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


class _ReadsTheCount(_Plain):
    def forward(self, x, labels=None, **kwargs):
        total = ((self.linear(x).squeeze(-1) - labels) ** 2).sum()
        return {"loss": total / kwargs.get("num_items_in_batch", labels.numel())}


class _NamesTheCount(_Plain):
    def forward(self, x, labels=None, num_items_in_batch=None):
        return super().forward(x, labels)


class _OptsOut(_ReadsTheCount):
    accepts_loss_kwargs = False


_gpt2, _t5, _llama, _bert = tiny_gpt2, tiny_t5, tiny_llama, tiny_bert


@pytest.mark.parametrize(
    ("make", "accepts", "transformers_accepts"),
    [(_Plain, False, False), (_TakesKwargs, False, True), (_ReadsTheCount, True, True),
     (_NamesTheCount, True, False), (_OptsOut, False, False), (_llama, True, True), (_gpt2, True, True),
     (_bert, False, True), (_t5, False, True)],
    ids=["plain", "ignores-kwargs", "reads-the-count", "names-the-count", "opted-out", "llama", "gpt2", "bert",
         "t5"],
)
def test_model_accepts_loss_kwargs_when_its_forward_uses_the_count(tmp_path, make, accepts, transformers_accepts):
    # transformers' Trainer takes any forward(**kwargs); optsched only a forward that reads the count or
    # hands **kwargs to self.loss_function: BERT's and T5's mean losses keep the accumulation division
    model = make()
    assert model_accepts_loss_kwargs(model) is accepts
    assert model_accepts_loss_kwargs(torch.compile(model)) is accepts  # the wrapped model decides
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer.model_accepts_loss_kwargs is accepts
    hf = transformers.Trainer(model, transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                   report_to="none"))
    assert hf.model_accepts_loss_kwargs is transformers_accepts


@pytest.mark.parametrize(
    ("make", "shifts"),
    [(_llama, True), (_gpt2, True), (_t5, False), (_bert, False), (_TakesKwargs, False)],
    ids=["llama", "gpt2", "t5", "bert", "plain"],
)
def test_loss_shifts_labels_follows_the_loss_the_model_runs(make, shifts):
    assert loss_shifts_labels(make()) is shifts


def test_gpt2_given_the_shifted_count_trains_on_its_mean_loss():
    # transformers 5.23's Trainer counts GPT-2's first labels too (loss_type None): (L-1)/L of the mean
    torch.manual_seed(0)
    model = _gpt2()
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "labels": torch.randint(0, 50, (2, 6))}
    count = count_label_items([batch], shift_labels=loss_shifts_labels(model))
    assert count == 2 * 5
    normalised = model(**batch, num_items_in_batch=torch.tensor(count)).loss
    torch.testing.assert_close(normalised, model(**batch).loss)


def test_count_label_items():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert count_label_items([{"labels": labels}]) == 3
    assert count_label_items([{"labels": labels}], shift_labels=True) == 1  # labels[..., 1:]
    assert count_label_items([{"labels": labels, "shift_labels": labels}], shift_labels=True) == 3
    assert count_label_items([{"labels": labels}, (torch.ones(2), torch.tensor([4, -100]))]) == 4
    assert count_label_items([{"labels": torch.rand(2, 3)}]) == 6  # float labels: every element
    assert count_label_items([torch.ones(2)]) is None
    assert count_label_items([{"x": torch.ones(2)}]) is None


def _train_llama(trainer_name, output_dir, opt_out=False, **overrides):
    kw = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    kw.update(overrides)
    torch.manual_seed(0)
    model = _llama()
    trainer = make_trainer(trainer_name, model, masked_lm_data(), **kw)
    if opt_out:
        trainer.model_accepts_loss_kwargs = False  # transformers' switch: the mean of micro-batch means
    trainer.train()
    losses = [entry.get("loss", entry.get("train_loss")) for entry in trainer.state.log_history
              if "loss" in entry or "train_loss" in entry]
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def test_accumulation_weighs_tokens_like_transformers_trainer(tmp_path):
    ours, our_losses = _train_llama("optsched", tmp_path / "ours")
    hf, hf_losses = _train_llama("hf", tmp_path / "hf")
    assert all(torch.equal(ours[key], value) for key, value in hf.items())  # bitwise, as transformers
    assert our_losses == hf_losses
    # the test can fail: the mean of micro-batch means trains another model
    mean_of_means, _ = _train_llama("optsched", tmp_path / "old", opt_out=True)
    assert max((mean_of_means[k] - v).abs().max().item() for k, v in hf.items()) > 1e-4


@pytest.mark.parametrize(
    "overrides",
    [dict(max_steps=7, logging_steps=3), dict(max_steps=-1, num_train_epochs=3, logging_strategy="epoch"),
     dict(max_steps=5, gradient_accumulation_steps=3, logging_steps=2)],
    ids=["steps-window", "epoch-window", "ga3"],
)
def test_logged_losses_are_transformers_bitwise(tmp_path, overrides):
    # windows of several steps of several micro-batches: the window sums each micro-batch's loss in
    # transformers' order (the steps' sums added instead were a few ulps off in loss and train_loss)
    ours, our_losses = _train_llama("optsched", tmp_path / "ours", **overrides)
    hf, hf_losses = _train_llama("hf", tmp_path / "hf", **overrides)
    assert all(torch.equal(ours[key], value) for key, value in hf.items())
    assert len(our_losses) > 2 and our_losses == hf_losses  # the last one is train_loss


def test_sequence_classification_keeps_the_division_transformers_trainer_loses(tmp_path):
    # BERT's forward takes **kwargs but its classification loss is a plain mean that ignores
    # num_items_in_batch: transformers' Trainer passes the count anyway and skips the division by the
    # accumulation steps (GA x the mean: a logged loss near 3 x ln 2 at GA 3); optsched does not pass it
    # and divides, as transformers' Trainer does when told the model takes no loss kwargs. 13 samples,
    # batch 2, GA 3: a short last batch and a short last accumulation group in every epoch
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
            for _ in range(13)]
    results = {}
    for name in ("optsched", "hf-no-loss-kwargs", "hf"):
        kw = dict(output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=2,
                  gradient_accumulation_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                  disable_tqdm=True, use_cpu=True, seed=0)
        torch.manual_seed(0)
        model = _bert()
        trainer = make_trainer("hf" if name.startswith("hf") else name, model, data, **kw)
        if name.startswith("hf"):
            trainer.model_accepts_loss_kwargs = name == "hf"
        else:
            assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        logs = [{k: entry[k] for k in ("loss", "grad_norm", "epoch", "step") if k in entry}
                for entry in trainer.state.log_history]
        results[name] = (model.state_dict(), logs)
    (ours, our_logs), (mean, mean_logs), (_, hf_logs) = results["optsched"], results["hf-no-loss-kwargs"], results["hf"]
    assert all(torch.equal(ours[key], value) for key, value in mean.items())
    assert our_logs == mean_logs
    first = [entry["loss"] for entry in our_logs if "loss" in entry][0]
    assert first < 1.0 < [entry["loss"] for entry in hf_logs if "loss" in entry][0]  # ln 2 against 3 ln 2


def test_a_peft_wrapper_is_decided_by_the_model_it_wraps():
    # a LoRA-wrapped Llama trains with the token count, as transformers' Trainer (unwrap_peft_model) does
    assert model_accepts_loss_kwargs(PeftStyleWrapper(_llama())) is True
    assert loss_shifts_labels(PeftStyleWrapper(_llama())) is True
    assert model_accepts_loss_kwargs(PeftStyleWrapper(_bert())) is False
