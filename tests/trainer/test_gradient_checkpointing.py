"""activation_checkpointing (gradient_checkpointing): the model's own activation_checkpointing_enable, as
transformers' Trainer calls it."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainingArguments
from trainer_helpers import PlainRegressor, make_trainer, masked_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")


_Plain = PlainRegressor


@pytest.mark.parametrize(
    "fields",
    [{"activation_checkpointing": True},
     {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}},
     {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"every_n_layers": 2}},
     {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}],
    ids=["on", "torch-kwargs", "every-2nd-layer", "transformers-4-names"],
)
def test_activation_checkpointing_trains_as_transformers_trainer(tmp_path, fields):
    # the model's own activation_checkpointing_enable(...), before training, as transformers' Trainer calls it
    runs = {}
    for name in ("optsched", "hf"):
        kw = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                  disable_tqdm=True, use_cpu=True, seed=0, **fields)
        torch.manual_seed(0)
        model = tiny_llama()
        trainer = make_trainer(name, model, masked_lm_data(), **kw)
        assert not model.is_activation_checkpointing
        trainer.train()
        assert model.is_activation_checkpointing
        runs[name] = model.state_dict()
    assert all(torch.equal(runs["optsched"][k], v) for k, v in runs["hf"].items())


def test_the_transformers_4_names_stand_for_the_new_ones():
    args = TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs='{"use_reentrant": false}')
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert TrainingArguments(activation_checkpointing=True).gradient_checkpointing is True  # mirrored
    assert TrainingArguments().activation_checkpointing is False


class _OldStyle(_Plain):
    """Only transformers 4's method."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.enabled_with = gradient_checkpointing_kwargs


def test_a_model_with_only_the_older_method_gets_it(tmp_path):
    data = [{"x": torch.ones(3), "labels": torch.tensor(1.0)}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, save_strategy="no",
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    model = _OldStyle()
    Trainer(model, args, train_dataset=data).train()
    assert model.enabled_with == {"use_reentrant": False}
    args.activation_checkpointing_kwargs = {"every_n_layers": 2}
    with pytest.raises(ValueError, match="has only gradient_checkpointing_enable"):
        Trainer(_OldStyle(), args, train_dataset=data).train()


def test_activation_checkpointing_needs_a_model_that_can(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, activation_checkpointing=True)
    trainer = Trainer(_Plain(), args, train_dataset=[{"x": torch.ones(3), "labels": torch.tensor(1.0)}] * 4)
    with pytest.raises(ValueError, match=r"activation_checkpointing=True, but the model \(PlainRegressor\) has no "
                                         r"activation_checkpointing_enable"):
        trainer.train()
