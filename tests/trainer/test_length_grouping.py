"""group_by_length: transformers' length-grouped training order (optsched.trainer.length_grouping)."""

from __future__ import annotations

import logging

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.length_grouping import LengthGroupedOrder, dataset_lengths, get_length_grouped_indices
from trainer_helpers import make_trainer, pad_collate, record_batches, tiny_llama, varied_length_data

transformers = pytest.importorskip("transformers")
from transformers.trainer_pt_utils import get_length_grouped_indices as hf_grouped_indices  # noqa: E402


def _lengths(n, seed, high=12):
    return torch.randint(1, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("n", "batch_size", "mult"), [(1, 4, None), (23, 6, None), (200, 2, None), (500, 3, None),
                                                        (97, 4, 3), (30, 8, None)])
@pytest.mark.parametrize("seed", [0, 5])
def test_grouped_indices_are_transformers(n, batch_size, mult, seed):
    # lengths 1..11: many ties, where the stable sort and the first argmax decide
    lengths = _lengths(n, seed)
    ours = get_length_grouped_indices(lengths, batch_size, mult, torch.Generator().manual_seed(seed))
    theirs = hf_grouped_indices(lengths, batch_size, mult, torch.Generator().manual_seed(seed))
    assert ours == theirs
    assert sorted(ours) == list(range(n))


def test_the_order_replays_transformers_draws_from_the_seed():
    # transformers' epoch e: the global RNG seeded once, then per epoch the DataLoader's base seed (one
    # int64) and the sampler's randperm; asked for out of turn, the order is the same
    lengths = _lengths(40, 1)
    g = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(4):
        torch.empty((), dtype=torch.int64).random_(generator=g)
        expected.append(hf_grouped_indices(lengths, 4, generator=g))
    order = LengthGroupedOrder([{"input_ids": [0] * k} for k in lengths], batch_size=4, seed=3)
    assert [order(e) for e in (0, 1, 2, 3)] == expected
    assert [order(e) for e in (3, 1, 1, 0, 2)] == [expected[e] for e in (3, 1, 1, 0, 2)]
    assert len({tuple(o) for o in expected}) == 4  # each epoch its own order


def _run(kind, tmp_path, data=None, collate=pad_collate, **fields):
    kw = dict(output_dir=str(tmp_path / kind), per_device_train_batch_size=2, gradient_accumulation_steps=3,
              num_train_epochs=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
              use_cpu=True, seed=7)
    torch.manual_seed(0)
    model = tiny_llama()
    seen = record_batches(model)
    trainer = make_trainer(kind, model, varied_length_data() if data is None else data, collate, **(kw | fields))
    trainer.train()
    return trainer, seen


def test_training_sees_transformers_batches_bitwise(tmp_path):
    # 23 samples of 2 to 11 tokens, batch 2, GA 3: megabatches of 6, 12 batches an epoch (the last one of
    # 1 sample, a step of 2 batches), 3 epochs
    runs = {kind: _run(kind, tmp_path, train_sampling_strategy="group_by_length") for kind in ("optsched", "hf")}
    (ours, our_batches), (hf, hf_batches) = runs["optsched"], runs["hf"]
    assert len(our_batches) == 36 and our_batches == hf_batches
    assert all(torch.equal(p, q) for p, q in zip(ours.model.state_dict().values(), hf.model.state_dict().values()))
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (ours, hf)]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    # grouped: each megabatch's 3 batches in decreasing length (the longest sample moved to the very front)
    lengths = [len(x["input_ids"]) for x in varied_length_data()]
    epoch = [i for batch in our_batches[12:24] for i in batch]
    for start in range(0, 18, 6):
        chunk = [lengths[i] for i in epoch[start:start + 6]]
        assert chunk == sorted(chunk, reverse=True)


def test_group_by_length_is_transformers_4s_name(tmp_path):
    (_, flag), (_, strategy) = (_run("optsched", tmp_path, **fields) for fields in (
        {"group_by_length": True, "output_dir": str(tmp_path / "a")},
        {"train_sampling_strategy": "group_by_length", "output_dir": str(tmp_path / "b")}))
    _, shuffled = _run("optsched", tmp_path)
    assert flag == strategy != shuffled


def test_a_mid_epoch_resume_sees_the_uninterrupted_batches(tmp_path):
    # checkpoint 6 lies in epoch 1 (4 steps an epoch): transformers' Trainer replays epoch 0's order there
    fields = dict(train_sampling_strategy="group_by_length", save_strategy="steps", save_steps=6,
                  output_dir=str(tmp_path / "run"))
    straight, straight_batches = _run("optsched", tmp_path, **fields)
    torch.manual_seed(0)
    model = tiny_llama()
    resumed_batches = record_batches(model)
    resumed = Trainer(model, straight.args, pad_collate, train_dataset=varied_length_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert resumed_batches == straight_batches[18:]  # 6 steps x 3 batches done before the checkpoint
    assert resumed_batches[:6] != straight_batches[6:12]  # epoch 1's order, not epoch 0's
    assert all(torch.equal(p, q) for p, q in zip(straight.model.state_dict().values(),
                                                  resumed.model.state_dict().values()))


def test_data_seed_orders_the_groups(tmp_path):
    # transformers takes seed here even with data_seed set; optsched takes data_seed, as for the shuffle
    _, seeded = _run("optsched", tmp_path, train_sampling_strategy="group_by_length", seed=1, data_seed=7,
                     output_dir=str(tmp_path / "a"))
    _, plain = _run("optsched", tmp_path, train_sampling_strategy="group_by_length", seed=7,
                    output_dir=str(tmp_path / "b"))
    assert seeded == plain


# ---- where the lengths come from ----------------------------------------------------------------------


class _Columns(torch.utils.data.Dataset):
    """A datasets.Dataset's shape: rows by index, a column by name, ``column_names``."""

    def __init__(self, rows, lengths, column="length"):
        self.rows, self.column_names = rows, [*rows[0], column]
        self.columns = {column: lengths}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return self.columns[key] if isinstance(key, str) else self.rows[key]


def test_lengths_from_a_column_or_from_the_model_input():
    rows = [{"input_ids": [1] * k, "x": [0] * (5 - k)} for k in (1, 4, 2)]
    assert dataset_lengths(rows) == [1, 4, 2]
    assert dataset_lengths(rows, model_input_name="x") == [4, 1, 3]
    assert dataset_lengths(_Columns(rows, torch.tensor([9, 8, 7]))) == [9, 8, 7]  # the column, not the items
    assert dataset_lengths(_Columns(rows, [9, 8, 7], "n"), length_column_name="n") == [9, 8, 7]
    assert dataset_lengths(_Columns(rows, [9, 8, 7], "n")) == [1, 4, 2]  # no "length" column: measured


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        ([(torch.ones(3), torch.tensor(1.0))] * 4, {}, ValueError,
         r"group_by_length measures each item's model_input_name='input_ids', but item 0 of the training dataset "
         r"is a tuple, not a mapping\. Accepted: .*length_column_name='length'"),
        ([{"input_ids": [1]}, {"tokens": [1, 2]}], {}, ValueError,
         r"item 1 of the training dataset is a mapping without that key \(keys: \['tokens'\]\)"),
        ([{"input_ids": [1]}], {"model_input_name": "tokens"}, ValueError, r"model_input_name='tokens'"),
        ([{"input_ids": torch.tensor(3)}], {}, TypeError, r"item 0's is a Tensor without a length"),
        (_Columns([{"a": 1}] * 3, [1, 2]), {}, ValueError,
         r"length_column_name='length' gives 2 lengths for a dataset of 3 items"),
        (_Columns([{"a": 1}] * 2, [1, -2]), {}, ValueError, r"gives item 1 the length -2 \(int\)"),
        (_Columns([{"a": 1}] * 2, [1, None]), {}, ValueError, r"gives item 1 the length None"),
        ([], {}, ValueError, "the training dataset is empty"),
    ],
    ids=["tuples", "a-missing-key", "custom-name", "no-len", "short-column", "negative", "none", "empty"],
)
def test_unmeasurable_items_are_refused_clearly(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        dataset_lengths(data, **kwargs)


def test_the_trainer_refuses_them_before_training(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, save_strategy="no",
                             group_by_length=True)
    trainer = Trainer(torch.nn.Linear(3, 1), args, train_dataset=[(torch.ones(3), torch.tensor(1.0))] * 4)
    with pytest.raises(ValueError, match=r"group_by_length measures each item's model_input_name='input_ids'"):
        trainer.get_train_dataloader()


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_an_iterable_dataset_is_read_in_its_own_order_with_a_warning(tmp_path, caplog):
    data = varied_length_data(8)
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.dataloaders"):
        _, seen = _run("optsched", tmp_path, data=_Stream(data), max_steps=4, gradient_accumulation_steps=1,
                       train_sampling_strategy="group_by_length")
    assert seen == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "train_sampling_strategy='group_by_length' is ignored: the training dataset (_Stream)" in caplog.text


def test_evaluation_keeps_the_dataset_order(tmp_path):
    # transformers groups evaluation batches too, and predict() then returns rows in a shuffled order
    torch.manual_seed(0)
    model = tiny_llama()
    seen = record_batches(model)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=3,
                             train_sampling_strategy="group_by_length", report_to="none")
    trainer = Trainer(model, args, pad_collate, eval_dataset=varied_length_data(7))
    trainer.predict(varied_length_data(7))
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
