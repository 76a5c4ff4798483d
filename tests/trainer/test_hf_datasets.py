"""The Trainer on real ``datasets.Dataset`` / ``IterableDataset`` objects, as users pass them.

A tokenized GLUE-like table (``text``, ``label``, ``idx`` beside the model's inputs, rows of python lists
of varying lengths) with transformers' ``DataCollatorWithPadding`` and a tokenizer built in code; the same
table formatted as torch tensors with the default collator; a ``length`` column for length grouping; a
streamed ``IterableDataset`` with ``max_steps``. Each runs transformers' Trainer with the same fields and
compares weights (bitwise), logs and metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer_helpers import assert_same_logs, make_trainer

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = 40


def _tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def _glue_like(n: int = 30, seed: int = 0):
    """``text``, ``label``, ``idx`` and the tokenizer's ``input_ids`` / ``token_type_ids`` / ``attention_mask``
    (3 to 14 tokens a row), as ``Dataset.map(tokenizer, batched=True)`` leaves them."""
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(f"w{int(w)}" for w in torch.randint(0, WORDS, (int(torch.randint(3, 15, (), generator=g)),),
                                                         generator=g)) for _ in range(n)]
    raw = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(n)], "idx": list(range(n))})
    tok = _tokenizer()
    return raw.map(lambda rows: tok(rows["text"]), batched=True), tok


def _bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=WORDS + 4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def _run(kind, tmp_path, train, collator=None, eval_dataset=None, **fields):
    model = _bert()
    fields = {"output_dir": str(tmp_path / kind), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 5,
              "learning_rate": 1e-2, "logging_steps": 2, "seed": 0, "disable_tqdm": True, "save_strategy": "no",
              **fields}
    trainer = make_trainer(kind, model, train, collator, eval_dataset,
                           compute_metrics=_accuracy if eval_dataset is not None else None, **fields)
    output = trainer.train()
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    return model, output, metrics, trainer.state.log_history


def _assert_same_runs(ours, theirs):
    (m_ours, out_ours, met_ours, logs_ours), (m_hf, out_hf, met_hf, logs_hf) = ours, theirs
    for (name, a), b in zip(m_ours.state_dict().items(), m_hf.state_dict().values()):
        assert torch.equal(a, b), name
    assert out_ours.global_step == out_hf.global_step and out_ours.training_loss == out_hf.training_loss
    assert_same_logs(logs_ours, logs_hf)
    assert met_ours.keys() == met_hf.keys()
    assert met_ours.get("eval_accuracy") == met_hf.get("eval_accuracy")
    if "eval_loss" in met_hf:
        assert met_ours["eval_loss"] == pytest.approx(met_hf["eval_loss"], rel=1e-6)


def test_a_tokenized_table_with_a_padding_collator_trains_and_evaluates_as_transformers(tmp_path):
    """The usual script: text, label and idx columns dropped for the model (remove_unused_columns), label
    renamed labels, each batch padded to its longest row by transformers' DataCollatorWithPadding."""
    data, tok = _glue_like()
    collator = transformers.DataCollatorWithPadding(tok)
    ours = _run("optsched", tmp_path, data, collator, data, num_train_epochs=2, eval_strategy="epoch")
    _assert_same_runs(ours, _run("hf", tmp_path, data, collator, data, num_train_epochs=2, eval_strategy="epoch"))
    assert 0.0 <= ours[2]["eval_accuracy"] <= 1.0 and ours[1].training_loss > 0.0


def test_a_torch_formatted_table_with_the_default_collator_is_transformers(tmp_path):
    """``set_format("torch")`` rows of one length, no collator given: the default collator's batches."""
    data, _ = _glue_like()
    data = data.filter(lambda row: len(row["input_ids"]) >= 8).map(
        lambda row: {k: row[k][:8] for k in ("input_ids", "attention_mask")})
    data.set_format("torch")
    ours = _run("optsched", tmp_path, data, None, data, max_steps=5)
    _assert_same_runs(ours, _run("hf", tmp_path, data, None, data, max_steps=5))


def _widths(kind, tmp_path, data, collator):
    trainer = make_trainer(kind, _bert(), data, collator, output_dir=str(tmp_path / kind), seed=0,
                           per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    return [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()]


def test_length_grouping_on_a_table_gives_transformers_batches(tmp_path):
    """``train_sampling_strategy="group_by_length"`` with the ``length`` column users compute with ``map``:
    the padded widths of the batches (the longest first), the weights and the logs are transformers'."""
    data, tok = _glue_like(n=40)
    data = data.map(lambda rows: {"length": [len(ids) for ids in rows["input_ids"]]}, batched=True)
    collator = transformers.DataCollatorWithPadding(tok)
    widths = _widths("optsched", tmp_path, data, collator)
    assert widths == _widths("hf", tmp_path, data, collator)
    assert widths[0] == max(widths) and len(set(widths)) > 3
    fields = {"num_train_epochs": 1, "train_sampling_strategy": "group_by_length"}
    _assert_same_runs(_run("optsched", tmp_path, data, collator, **fields),
                      _run("hf", tmp_path, data, collator, **fields))


def test_length_grouping_reads_the_length_column_where_transformers_drops_it(tmp_path):
    """A deliberate difference (optsched.trainer.length_grouping): transformers removes the unused columns,
    the length column with them, before its sampler looks, so it measures ``input_ids`` whatever the column
    says; optsched groups by the column it was told to read. Here the column ranks the rows backwards."""
    data, tok = _glue_like(n=40)
    data = data.map(lambda rows: {"length": [100 - len(ids) for ids in rows["input_ids"]]}, batched=True)
    collator = transformers.DataCollatorWithPadding(tok)
    ours, theirs = _widths("optsched", tmp_path, data, collator), _widths("hf", tmp_path, data, collator)
    assert theirs[0] == max(theirs)  # transformers: the longest rows first
    shortest = min(len(ids) for ids in data["input_ids"])
    assert ours[0] < max(ours) and ours != theirs  # optsched: the first batch holds the "longest" by the column
    trainer = make_trainer("optsched", _bert(), data, collator, output_dir=str(tmp_path / "o"), seed=0,
                           per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    first = next(iter(trainer.get_train_dataloader()))
    assert int(first["attention_mask"].sum(-1).min()) == shortest


def test_a_streamed_iterable_dataset_with_max_steps_is_transformers(tmp_path):
    """``Dataset.to_iterable_dataset()``: no length, so ``max_steps``; the stream is read again for a second
    pass, and the epochs in the logs count the passes as transformers counts them."""
    data, tok = _glue_like(n=22)
    stream = data.to_iterable_dataset()
    collator = transformers.DataCollatorWithPadding(tok)
    ours = _run("optsched", tmp_path, stream, collator, max_steps=9, logging_steps=1)
    _assert_same_runs(ours, _run("hf", tmp_path, stream, collator, max_steps=9, logging_steps=1))
    # 6 batches a pass; transformers counts a pass's steps in max_steps
    assert [round(e["epoch"], 3) for e in ours[3] if "loss" in e][5:7] == [0.667, 1.111]
