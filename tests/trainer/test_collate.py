"""The default collator and remove_unused_columns (optsched.trainer.collate): transformers' batches."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.collate import RemoveColumnsCollator, default_data_collator, signature_columns
from trainer_helpers import PlainRegressor, make_trainer, tiny_bert

transformers = pytest.importorskip("transformers")

SAMPLES = {
    "int-label": [{"input_ids": [1, 2, 3], "label": 1}, {"input_ids": [4, 5, 6], "label": 0}],
    "float-label": [{"x": [0.5, 1.5], "label": 0.25}, {"x": [1.0, 2.0], "label": 1.0}],
    "tensor-label": [{"x": torch.ones(2), "label": torch.tensor(1)}, {"x": torch.zeros(2), "label": torch.tensor(0)}],
    "label-ids-list": [{"input_ids": [1, 2], "label_ids": [0, 1]}, {"input_ids": [3, 4], "label_ids": [1, 1]}],
    "label-ids-tensor": [{"a": np.arange(3), "label_ids": torch.tensor([0.5, 1.0])},
                         {"a": np.arange(3) + 1, "label_ids": torch.tensor([1.5, 2.0])}],
    "strings-and-none": [{"input_ids": [1, 2], "text": "a b", "extra": None, "labels": [1, 2]},
                         {"input_ids": [3, 4], "text": "c d", "extra": None, "labels": [3, 4]}],
    "floats-bools": [{"w": 0.5, "m": True}, {"w": 1.5, "m": False}],
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_dict_samples_collate_as_transformers_default_data_collator(name):
    from transformers.data.data_collator import default_data_collator as hf_collator

    ours, theirs = default_data_collator(SAMPLES[name]), hf_collator(SAMPLES[name])
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_samples_transformers_cannot_collate_go_to_torchs_default_collate():
    pairs = [(torch.ones(2), torch.tensor(1.0)), (torch.zeros(2), torch.tensor(0.0))]
    x, y = default_data_collator(pairs)
    assert x.shape == (2, 2) and torch.equal(y, torch.tensor([1.0, 0.0]))
    nested = default_data_collator([{"inputs": {"a": torch.ones(2)}}, {"inputs": {"a": torch.zeros(2)}}])
    assert nested["inputs"]["a"].shape == (2, 2)


def test_values_of_different_lengths_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"'input_ids' values cannot be stacked.*DataCollatorWithPadding"):
        default_data_collator([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"'x' values cannot be stacked"):
        default_data_collator([{"x": torch.ones(3)}, {"x": torch.ones(2)}])


def test_signature_columns_are_forwards_parameters_and_the_label_keys():
    def forward(input_ids, attention_mask=None, **kwargs):
        return input_ids

    def forward_any(**batch):
        return batch

    assert signature_columns(forward, ["targets"]) == [
        "input_ids", "attention_mask", "kwargs", "label", "label_ids", "targets"]
    assert signature_columns(forward_any, []) is None  # transformers would drop every key


def test_unused_columns_are_removed_once_logged(caplog):
    collator = RemoveColumnsCollator(default_data_collator, ["x", "labels"], "Model", "training")
    samples = [{"x": [1.0], "labels": 0.5, "idx": 3, "text": "t"}] * 2
    with caplog.at_level(logging.INFO, logger="optsched.trainer.collate"):
        batch = collator(samples)
        collator(samples)
    assert sorted(batch) == ["labels", "x"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "idx, text" in messages[0] and "training set" in messages[0]


def _labelled_data(n=10):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g).tolist(), "label": i % 2, "idx": i,
             "sentence": f"sample {i}"} for i in range(n)]


def test_a_label_column_trains_bert_as_transformers_trainer(tmp_path):
    # "label" renamed "labels", "idx" and "sentence" dropped: BERT's forward(**kwargs) would otherwise take
    # them silently and return no loss
    weights = {}
    for name in ("optsched", "hf"):
        torch.manual_seed(0)
        model = tiny_bert()
        trainer = make_trainer(name, model, _labelled_data(), output_dir=str(tmp_path / name), max_steps=3,
                               per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                               disable_tqdm=True, use_cpu=True, seed=0)
        trainer.train()
        weights[name] = model.state_dict()
    assert all(torch.equal(weights["optsched"][k], v) for k, v in weights["hf"].items())


def test_remove_unused_columns_false_passes_every_key(tmp_path):
    data = [{"x": torch.randn(3), "labels": torch.randn(()), "idx": i} for i in range(4)]
    fields = dict(output_dir=str(tmp_path), max_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(PlainRegressor(), TrainingArguments(**fields), train_dataset=data).train()  # idx removed
    trainer = Trainer(PlainRegressor(), TrainingArguments(remove_unused_columns=False, **fields), train_dataset=data)
    with pytest.raises(TypeError, match="idx"):
        trainer.train()
    assert trainer.data_collator is default_data_collator


def test_evaluation_removes_unused_columns_too(tmp_path):
    data = [{"x": torch.randn(3), "labels": torch.randn(()), "note": "n"} for _ in range(5)]
    trainer = Trainer(PlainRegressor(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True), eval_dataset=data)
    assert np.isfinite(trainer.evaluate()["eval_loss"])
    assert trainer.predict(data).label_ids.shape == (5,)
