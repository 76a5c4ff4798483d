"""Trainer features used together: combinations a user plausibly sets at once, on tiny BERT / Llama models.

Each combination runs transformers' Trainer with the same fields where transformers runs it on the CPU and
compares weights, logs, metrics and checkpoints on disk (bitwise, or to the float noise named), or, where
transformers cannot run it or differs on purpose, compares optsched's run with its own single-feature run.
The bugs these found: ``eval_on_start`` evaluated without ``train(ignore_keys_for_eval=...)``; a smoothed (or
``compute_loss_func``) evaluation loss under ``bf16_full_eval`` / ``fp16_full_eval`` divided in half
precision (no label count given in evaluation, an int64 one in training, where transformers passes a float
count); under ``bf16`` autocast the loss functions and ``batch_eval_metrics`` got bfloat16 logits where
transformers' accelerate hands on float32 ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from optsched import Trainer, TrainerCallback, TrainingArguments
from test_metrics import two_length_lm_data  # 7 samples of 6 / 8 tokens, labels masked from various places
from trainer_helpers import (
    PeftStyleWrapper,
    assert_same_logs,
    make_trainer,
    masked_lm_data,
    pad_collate,
    padded_lm_data,
    record_batches,
    run_torchrun,
    tiny_bert,
    tiny_llama,
    varied_length_data,
)

transformers = pytest.importorskip("transformers")

def _classification_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
            for _ in range(n)]


def _lm_collate(items):
    batch = pad_collate(items)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(t, theirs[n]) for n, t in a.state_dict().items())


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir() if p.name.startswith("checkpoint-"))


def _assert_same_checkpoints(ours: Path, theirs: Path) -> None:
    """The same checkpoints, each with transformers' model.safetensors bitwise and its trainer_state.json:
    every field equal (a best checkpoint by its name), the log history as :func:`_assert_same_logs`."""
    assert _checkpoints(ours) == _checkpoints(theirs)
    for step in _checkpoints(ours):
        a, b = (json.loads((root / f"checkpoint-{step}" / "trainer_state.json").read_text())
                for root in (ours, theirs))
        assert_same_logs(a.pop("log_history"), b.pop("log_history"))
        for state in (a, b):
            if state.get("best_model_checkpoint"):
                state["best_model_checkpoint"] = Path(state["best_model_checkpoint"]).name
        best_a, best_b = a.pop("best_metric"), b.pop("best_metric")
        assert best_a == (None if best_b is None else pytest.approx(best_b, rel=1e-6))
        assert {k: a.get(k) for k in b} == b, step
        weights = [load_file(str(root / f"checkpoint-{step}" / "model.safetensors")) for root in (ours, theirs)]
        assert all(torch.equal(t, weights[1][n]) for n, t in weights[0].items())


class _DrawAsTransformersLoadersDo(TrainerCallback):
    """transformers' DataLoaders have no generator of their own: each epoch's and each evaluation's iterator
    draws one int64 from the global generator, which NEFTune's noise comes from too. optsched's loaders draw
    from their own; with these draws its run draws the same noise at the same forward. (An evaluation draws
    nothing else: the model is in eval mode, noise-free.)"""

    def on_epoch_begin(self, args, state, control, **kwargs):
        torch.empty((), dtype=torch.int64).random_()

    def on_evaluate(self, args, state, control, **kwargs):
        torch.empty((), dtype=torch.int64).random_()


def _scripted_scores(values):
    scores = iter(values)
    return lambda eval_pred: {"score": next(scores)}


# ---- load_best_model_at_end with each of today's other features -------------------------------------------


def _best_fields(out: Path, **overrides):
    """tiny BERT, 13 samples in batches of 4 (a short last batch each epoch), 12 steps evaluated and saved
    every 2: the eval loss is lowest at step 4."""
    return dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=0.03,
                eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, logging_steps=2,
                disable_tqdm=True, use_cpu=True, seed=0, load_best_model_at_end=True) | overrides


#: (fields, scripted scores for compute_metrics or None, the best step)
BEST_WITH = {
    # the step-0 evaluation scores highest: transformers does not count it as a best (no checkpoint 0)
    "eval_on_start": (dict(eval_on_start=True, metric_for_best_model="score"),
                      (0.9, 0.4, 0.2, 0.1, 0.7, 0.5, 0.3), 8),
    "eval_on_start-limit-1": (dict(eval_on_start=True, save_total_limit=1), None, 4),
    "bf16_full_eval": (dict(bf16_full_eval=True), None, 4),
    "bf16-and-bf16_full_eval": (dict(bf16=True, bf16_full_eval=True), None, 4),
    "torch_compile": (dict(torch_compile_backend="eager", save_total_limit=2), None, 4),
    "neftune": (dict(neftune_noise_alpha=5.0), None, 6),
    "include_num_input_tokens_seen": (dict(include_num_input_tokens_seen=True), None, 4),
    "eval_do_concat_batches": (dict(eval_do_concat_batches=False, metric_for_best_model="score"),
                               (0.4, 0.2, 0.1, 0.7, 0.5, 0.3), 8),
}


@pytest.mark.parametrize("combo", list(BEST_WITH))
def test_load_best_model_at_end_with_another_feature_is_transformers(tmp_path, combo):
    fields, scores, best_step = BEST_WITH[combo]
    runs = {}
    for kind in ("optsched", "hf"):
        torch.manual_seed(0)
        noisy = kind == "optsched" and "neftune_noise_alpha" in fields
        callbacks = [_DrawAsTransformersLoadersDo()] if noisy else None
        trainer = make_trainer(kind, tiny_bert(), _classification_data(13, 0), None, _classification_data(7, 1),
                               compute_metrics=_scripted_scores(scores) if scores else None, callbacks=callbacks,
                               **_best_fields(tmp_path / kind, **fields))
        trainer.train()
        runs[kind] = trainer
    ours, theirs = runs["optsched"], runs["hf"]
    assert ours.state.best_global_step == theirs.state.best_global_step == best_step
    assert Path(ours.state.best_model_checkpoint) == tmp_path / "optsched" / f"checkpoint-{best_step}"
    _assert_same_checkpoints(tmp_path / "optsched", tmp_path / "hf")
    assert_same_logs(ours.state.log_history, theirs.state.log_history)
    assert _same_weights(ours.model, theirs.model)  # the best checkpoint's, loaded
    best = load_file(str(tmp_path / "optsched" / f"checkpoint-{best_step}" / "model.safetensors"))
    assert all(torch.equal(t, ours.model.state_dict()[n]) for n, t in best.items())
    assert {p.dtype for p in ours.model.parameters()} == {torch.float32}  # bf16_full_eval: nothing cast is loaded
    embeddings = ours.model.get_input_embeddings()  # NEFTune's hook and attribute gone, as transformers' are
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")


def test_eval_on_start_leaves_out_the_ignore_keys_for_eval(tmp_path):
    # was: the step-0 evaluation kept the hidden states that train(ignore_keys_for_eval=...) leaves out of
    # every other evaluation (optsched 2 outputs at step 0, transformers 1)
    def outputs(eval_pred):
        return {"outputs": 1 if isinstance(eval_pred.predictions, np.ndarray) else len(eval_pred.predictions)}

    counts = {}
    for kind in ("optsched", "hf"):
        torch.manual_seed(0)
        model = tiny_bert()
        model.config.output_hidden_states = True
        data = _classification_data(8, 3)
        trainer = make_trainer(kind, model, data, None, data, compute_metrics=outputs,
                               output_dir=str(tmp_path / kind), max_steps=2, eval_strategy="steps", eval_steps=1,
                               per_device_train_batch_size=4, save_strategy="no", use_cpu=True, disable_tqdm=True,
                               eval_on_start=True)
        trainer.train(ignore_keys_for_eval=["hidden_states"])
        counts[kind] = [(h["step"], h["eval_outputs"]) for h in trainer.state.log_history if "eval_outputs" in h]
    assert counts["optsched"] == counts["hf"] == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("eval_on_start", [False, True], ids=["no-eval-on-start", "eval-on-start"])
def test_early_stopping_resumed_with_its_state_loads_transformers_best_model(tmp_path, eval_on_start):
    """EarlyStoppingCallback (patience 2) with restore_callback_states_from_checkpoint and
    load_best_model_at_end, resumed from step 6 (patience counter 1): both Trainers stop at step 8 and load
    step 4's weights; with eval_on_start the resumed run's step-6 evaluation counts against the patience as
    in transformers (stops at 7)."""
    runs = {}
    for kind in ("optsched", "hf"):
        for run in ("straight", "resumed"):
            out = tmp_path / kind / run
            if run == "resumed":
                shutil.copytree(tmp_path / kind / "straight" / "checkpoint-6", out / "checkpoint-6")
            torch.manual_seed(0)
            trainer = make_trainer(
                kind, tiny_bert(), _classification_data(13, 0), None, _classification_data(7, 1),
                callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=2)],
                **_best_fields(out, max_steps=20, restore_callback_states_from_checkpoint=True,
                               eval_on_start=eval_on_start))
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-6") if run == "resumed" else None)
            runs[kind, run] = trainer
    for run, stop in (("straight", 8), ("resumed", 7 if eval_on_start else 8)):
        ours, theirs = runs["optsched", run], runs["hf", run]
        assert ours.state.global_step == theirs.state.global_step == stop
        assert ours.state.best_global_step == theirs.state.best_global_step == 4
        assert _same_weights(ours.model, theirs.model)
        assert_same_logs(ours.state.log_history, theirs.state.log_history)
        stopper = next(c for c in ours.callback_handler.callbacks if type(c).__name__ == "EarlyStoppingCallback")
        assert stopper.early_stopping_patience_counter == 2
    assert _same_weights(runs["optsched", "straight"].model, runs["optsched", "resumed"].model)


# ---- group_by_length with a resume, the tokens count and remove_unused_columns ------------------------------


def _grouped(kind, out, resume=None, data=None, collate=pad_collate, **fields):
    """tiny Llama on 23 samples of 2-11 tokens, batch 2, GA 2, 2 epochs (12 batches an epoch, the last one
    short), grouped by length: the trainer and the samples of each batch it trained on."""
    torch.manual_seed(0)
    model = tiny_llama()
    seen = record_batches(model)
    trainer = make_trainer(kind, model, varied_length_data() if data is None else data, collate, output_dir=str(out),
                           **dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
                                  learning_rate=1e-2, save_strategy="steps", save_steps=8, logging_steps=1,
                                  disable_tqdm=True, use_cpu=True, seed=7, train_sampling_strategy="group_by_length")
                           | fields)
    trainer.train(resume_from_checkpoint=resume and str(out / resume))
    return trainer, seen


def test_group_by_length_resumed_with_ignore_data_skip_replays_its_epochs_grouped_order(tmp_path):
    # transformers' grouped order comes from the global RNG, which a resume restores from the checkpoint
    # before the epoch's order is drawn (another order than the uninterrupted run's): a documented
    # difference, so the reference is optsched's uninterrupted run. Checkpoint 8: 4 batches into epoch 1.
    straight, seen = _grouped("optsched", tmp_path)
    _, from_epoch_start = _grouped("optsched", tmp_path, "checkpoint-8", ignore_data_skip=True)
    assert from_epoch_start == seen[12:20]  # epoch 1's grouped batches from its first, for the 4 steps left
    resumed, skipping = _grouped("optsched", tmp_path, "checkpoint-8")
    assert skipping == seen[16:] and _same_weights(resumed.model, straight.model)


def test_group_by_length_counts_transformers_input_tokens(tmp_path):
    runs = {kind: _grouped(kind, tmp_path / kind, include_num_input_tokens_seen="all", save_strategy="no")
            for kind in ("optsched", "hf")}
    (ours, our_batches), (theirs, their_batches) = runs["optsched"], runs["hf"]
    assert our_batches == their_batches and len(our_batches) == 24
    # every padded element: grouping changes the padding, hence the count (185 ungrouped)
    assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen == 370
    assert_same_logs(ours.state.log_history, theirs.state.log_history)
    assert _same_weights(ours.model, theirs.model)


class _Columns(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` stand-in (datasets is not installed): rows by index, columns by name."""

    def __init__(self, rows):
        self.rows, self.column_names = rows, list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return [row[key] for row in self.rows] if isinstance(key, str) else self.rows[key]


def _collate_keeping_extras(keys: list):
    """pad_collate, and every other key stacked (what reaches the model is what remove_unused_columns left);
    each batch's keys appended to ``keys``."""

    def collate(items):
        batch = pad_collate(items)
        batch.update({k: torch.tensor([item[k] for item in items]) for k in items[0] if k not in batch})
        keys.append(sorted(batch))
        return batch

    return collate


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_group_by_length_reads_the_length_column_that_remove_unused_columns_drops(tmp_path, remove_unused_columns):
    # documented difference: transformers removes a datasets.Dataset's unused columns, the length column
    # among them, before it builds the sampler, and then measures model_input_name; optsched groups by the
    # column and drops it only from the batches. The column here ranks the samples in reverse.
    rows = [dict(d, length=20 - len(d["input_ids"]), idx=i) for i, d in enumerate(varied_length_data())]
    keys = []
    _, seen = _grouped("optsched", tmp_path, data=_Columns(rows), collate=_collate_keeping_extras(keys),
                       remove_unused_columns=remove_unused_columns, save_strategy="no", num_train_epochs=1)
    _, by_input_ids = _grouped("optsched", tmp_path, save_strategy="no", num_train_epochs=1)
    # the column's longest first: the shortest input_ids
    assert len(rows[seen[0][0]]["input_ids"]) == min(len(r["input_ids"]) for r in rows) and seen != by_input_ids
    assert all(("length" in k and "idx" in k) is not remove_unused_columns for k in keys)


# ---- remove_unused_columns with include_for_metrics, label_names, a PEFT wrapper, torch_compile --------------


def _rows(n: int, seed: int) -> list[dict]:
    """BERT classification rows with a 'label' to rename and 'idx' / 'sentence' columns the model does not take,
    an attention_mask with 3 to 5 ones."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        mask = torch.ones(6, dtype=torch.long)
        mask[3 + i % 3:] = 0
        rows.append({"input_ids": torch.randint(0, 50, (6,), generator=g), "attention_mask": mask, "label": i % 2,
                     "idx": i, "sentence": f"s{i}"})
    return rows


def _recorder(seen: list):
    """compute_metrics (either call form) that records each EvalPrediction's arrays, tensors (per batch) and
    batch (a dict, with batch_eval_metrics' inputs)."""

    def compute_metrics(eval_pred, compute_result=False):
        seen.append([x if isinstance(x, (dict, torch.Tensor, list)) else np.asarray(x) for x in eval_pred])
        predictions = eval_pred.predictions
        parts = predictions if isinstance(predictions, list) else [predictions]  # eval_do_concat_batches=False
        return {"total": sum(float(torch.as_tensor(p).float().sum()) for p in parts)}

    return compute_metrics


def _column_run(kind, model, out, seen, **fields):
    torch.manual_seed(0)
    trainer = make_trainer(kind, model, _rows(10, 0), None, _rows(5, 1), compute_metrics=_recorder(seen),
                           output_dir=str(out), **dict(max_steps=3, per_device_train_batch_size=3,
                                                        per_device_eval_batch_size=2, learning_rate=0.05,
                                                        eval_strategy="steps", eval_steps=3, save_strategy="no",
                                                        logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
                                                        include_for_metrics=["inputs", "loss"]) | fields)
    trainer.train()
    return trainer


def _assert_same_eval_predictions(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b, strict=True):
            assert type(x) is type(y)
            if isinstance(x, dict):  # batch_eval_metrics: the whole batch
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            elif isinstance(x, torch.Tensor):  # batch_eval_metrics: the batch's tensors
                assert x.dtype == y.dtype and torch.equal(x, y)
            elif isinstance(x, list):  # eval_do_concat_batches=False: per-batch arrays
                assert len(x) == len(y) and all(u.dtype == v.dtype and np.array_equal(u, v) for u, v in zip(x, y))
            else:
                assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("fields", [
    dict(),
    dict(label_names=["labels"]),
    dict(torch_compile_backend="eager"),
    dict(batch_eval_metrics=True),
], ids=["include_for_metrics", "label_names", "torch_compile", "batch_eval_metrics"])
def test_remove_unused_columns_with_metrics_inputs_is_transformers(tmp_path, fields):
    seen = {kind: [] for kind in ("optsched", "hf")}
    runs = {kind: _column_run(kind, tiny_bert(), tmp_path / kind, seen[kind], **fields) for kind in seen}
    assert _same_weights(runs["optsched"].model, runs["hf"].model)
    assert_same_logs(runs["optsched"].state.log_history, runs["hf"].state.log_history)
    _assert_same_eval_predictions(seen["optsched"], seen["hf"])
    inputs = seen["optsched"][-1][2]  # the collated inputs: idx and sentence gone, label renamed
    if isinstance(inputs, dict):
        assert sorted(inputs) == ["attention_mask", "input_ids", "labels"]
    else:
        assert inputs.shape == (5, 6)


def test_a_peft_wrapper_trains_as_its_model_with_the_columns_tokens_noise_and_compile(tmp_path):
    # transformers recognises peft's own class only (peft is not installed): the reference is the bare model
    fields = dict(include_num_input_tokens_seen="non_padding", neftune_noise_alpha=5.0, eval_on_start=True,
                  torch_compile_backend="eager")
    seen = {"wrapped": [], "bare": []}
    models = {}
    for name in seen:
        torch.manual_seed(0)
        models[name] = tiny_bert()
        model = PeftStyleWrapper(models[name]) if name == "wrapped" else models[name]
        seen[name] = []
        trainer = _column_run("optsched", model, tmp_path / name, seen[name], **fields)
        models[name, "tokens"] = trainer.state.num_input_tokens_seen
        models[name, "log"] = trainer.state.log_history
    assert _same_weights(models["wrapped"], models["bare"])
    assert models["wrapped", "tokens"] == models["bare", "tokens"] > 0
    # the stand-in has no floating_point_ops (peft's PeftModel hands that on to its model)
    assert_same_logs(models["wrapped", "log"], models["bare", "log"], skip=("total_flos",))
    _assert_same_eval_predictions(seen["wrapped"], seen["bare"])


# ---- fp16 / bf16_full_eval with torch_compile, batch_eval_metrics, label smoothing; bf16 training ----------


@pytest.mark.parametrize("fields", [
    dict(torch_compile_backend="eager"),
    dict(batch_eval_metrics=True),
    dict(batch_eval_metrics=True, torch_compile_backend="eager"),
], ids=["torch_compile", "batch_eval_metrics", "both"])
def test_bf16_full_eval_with_compile_or_batch_metrics_is_transformers_and_gives_the_weights_back(tmp_path, fields):
    seen = {}
    runs = {}
    for kind in ("optsched", "hf"):
        seen[kind] = []
        torch.manual_seed(0)
        trainer = make_trainer(kind, tiny_llama(), two_length_lm_data(), _lm_collate, two_length_lm_data(),
                               compute_metrics=_recorder(seen[kind]), output_dir=str(tmp_path / kind), max_steps=3,
                               per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=0.05,
                               save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, bf16_full_eval=True,
                               **fields)
        runs[kind] = trainer, trainer.evaluate(), trainer.predict(two_length_lm_data())
    (ours, m_ours, p_ours), (theirs, m_theirs, p_theirs) = runs["optsched"], runs["hf"]
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=1e-6)
    np.testing.assert_array_equal(p_ours.predictions, p_theirs.predictions)
    _assert_same_eval_predictions(seen["optsched"], seen["hf"])
    if fields.get("batch_eval_metrics"):  # the cast model's logits (no autocast: no float32 conversion)
        assert seen["optsched"][0][0].dtype == torch.bfloat16
    # optsched puts the float32 weights back, where transformers leaves its model bfloat16 (a documented
    # difference): trained afterwards they end where the same Trainer without the flag ends, compiled or not
    assert {p.dtype for p in theirs.model.parameters()} == {torch.bfloat16}
    ours.train()
    torch.manual_seed(0)
    plain = make_trainer("optsched", tiny_llama(), two_length_lm_data(), _lm_collate,
                         output_dir=str(tmp_path / "plain"), max_steps=3, per_device_train_batch_size=2,
                         learning_rate=0.05, save_strategy="no",
                         disable_tqdm=True, use_cpu=True, seed=0, **fields)
    plain.train()
    assert {p.dtype for p in ours.model.parameters()} == {torch.float32} and _same_weights(ours.model, plain.model)


@pytest.mark.parametrize("fields", [
    dict(bf16_full_eval=True),
    dict(fp16_full_eval=True, eval_do_concat_batches=False),
    dict(bf16_full_eval=True, compute_loss_func=True),
], ids=["bf16_full_eval", "fp16_full_eval-per-batch", "compute_loss_func"])
def test_a_smoothed_half_precision_evaluation_loss_is_transformers(tmp_path, fields):
    # was: each sample's loss 1e-3 off transformers' under bf16_full_eval (3.8756 for 3.8787): optsched gave
    # the smoother no label count in evaluation, so it divided its bfloat16 sum by an int64 count (in
    # bfloat16), where transformers passes a float32 count (the division in float32)
    fields = dict(fields)

    def sum_loss(outputs, labels, num_items_in_batch=None):  # a compute_loss_func that sums in the logits' dtype
        logits, labels = outputs.logits[:, :-1], labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return losses.sum() / num_items_in_batch

    loss_func = sum_loss if fields.pop("compute_loss_func", False) else None
    smoothing = {} if loss_func else {"label_smoothing_factor": 0.1}
    seen = {}
    for kind in ("optsched", "hf"):
        seen[kind] = []
        torch.manual_seed(0)
        model = tiny_llama()
        args_fields = dict(output_dir=str(tmp_path / kind), per_device_eval_batch_size=2, use_cpu=True,
                           disable_tqdm=True, include_for_metrics=["loss"], **smoothing, **fields)
        if kind == "hf":
            trainer = transformers.Trainer(model, transformers.TrainingArguments(report_to="none", **args_fields),
                                           _lm_collate, eval_dataset=two_length_lm_data(),
                                           compute_metrics=_recorder(seen[kind]), compute_loss_func=loss_func)
        else:
            trainer = Trainer(model, TrainingArguments(**args_fields), _lm_collate, eval_dataset=two_length_lm_data(),
                              compute_metrics=_recorder(seen[kind]), compute_loss_func=loss_func)
        seen[kind, "loss"] = trainer.evaluate()["eval_loss"]
    _assert_same_eval_predictions(seen["optsched"], seen["hf"])  # predictions, labels and each sample's loss
    assert seen["optsched", "loss"] == pytest.approx(seen["hf", "loss"], rel=1e-6)


def test_bf16_training_smooths_and_measures_float32_logits_as_transformers(tmp_path):
    # was: under bf16 autocast optsched smoothed the bfloat16 logits (training losses 2e-3 off transformers'
    # Trainer's, whose accelerate converts the model's outputs to float32) and batch_eval_metrics got
    # bfloat16 logits where transformers passes float32 ones
    seen = {}
    runs = {}
    for kind in ("optsched", "hf"):
        seen[kind] = []
        torch.manual_seed(0)
        trainer = make_trainer(kind, tiny_llama(), masked_lm_data(12), None, masked_lm_data(5),
                               compute_metrics=lambda p, compute_result=False, s=seen[kind]: s.append(p.predictions)
                               or {},
                               output_dir=str(tmp_path / kind), max_steps=4, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, per_device_eval_batch_size=2, learning_rate=1e-2,
                               logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no",
                               disable_tqdm=True, use_cpu=True, seed=0, bf16=True, label_smoothing_factor=0.1,
                               batch_eval_metrics=True)
        trainer.train()
        runs[kind] = trainer
    assert _same_weights(runs["optsched"].model, runs["hf"].model)
    assert_same_logs(runs["optsched"].state.log_history, runs["hf"].state.log_history)
    assert len(seen["optsched"]) == len(seen["hf"]) == 6
    for a, b in zip(seen["optsched"], seen["hf"]):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("kind_of_loss", ["compute_loss_func", "label_smoothing"])
def test_the_loss_after_a_bf16_forward_runs_in_float32_as_in_transformers(tmp_path, kind_of_loss):
    # was: optsched's autocast enclosed the whole loss, so a compute_loss_func's matmul ran in bfloat16 where
    # transformers' (accelerate autocasts the forward alone) runs it in float32: other losses, other weights
    seen: dict[str, set] = {}
    runs = {}
    for kind in ("optsched", "hf"):
        seen[kind] = set()
        projection = torch.randn(50, 50, generator=torch.Generator().manual_seed(1)) / 8

        def loss_func(outputs, labels, num_items_in_batch=None, seen=seen[kind], projection=projection):
            mixed = outputs.logits[:, :-1] @ projection  # float32 in transformers' Trainer
            seen.add(mixed.dtype)
            return torch.nn.functional.cross_entropy(mixed.transpose(1, 2), labels[:, 1:], reduction="sum") / (
                num_items_in_batch)

        torch.manual_seed(0)
        fields = dict(output_dir=str(tmp_path / kind), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                      logging_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, bf16=True)
        if kind_of_loss == "label_smoothing":
            fields["label_smoothing_factor"] = 0.1
            probe = torch.nn.Linear(2, 2)
            original = torch.nn.functional.log_softmax

            def log_softmax(x, *a, seen=seen[kind], **k):
                seen.add(probe(torch.ones(1, 2)).dtype)  # bfloat16 under an autocast, float32 outside one
                return original(x, *a, **k)

        args = (transformers.TrainingArguments(report_to="none", **fields) if kind == "hf"
                else TrainingArguments(**fields))
        trainer_class = transformers.Trainer if kind == "hf" else Trainer
        extra = {"compute_loss_func": loss_func} if kind_of_loss == "compute_loss_func" else {}
        trainer = trainer_class(tiny_llama(), args, train_dataset=masked_lm_data(12), **extra)
        if kind_of_loss == "label_smoothing":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.nn.functional, "log_softmax", log_softmax)
                trainer.train()
        else:
            trainer.train()
        runs[kind] = trainer
    assert seen["optsched"] == seen["hf"] == {torch.float32}
    assert _same_weights(runs["optsched"].model, runs["hf"].model)
    assert_same_logs(runs["optsched"].state.log_history, runs["hf"].state.log_history)


# ---- eval_do_concat_batches=False with batch_eval_metrics and include_for_metrics ---------------------------


def test_per_batch_lists_with_batch_metrics_and_inputs_are_transformers(tmp_path):
    fields = dict(per_device_eval_batch_size=2, use_cpu=True, disable_tqdm=True, eval_do_concat_batches=False,
                  batch_eval_metrics=True, include_for_metrics=["inputs", "loss"])
    runs = {}
    for kind in ("optsched", "hf"):
        seen = []
        torch.manual_seed(0)
        trainer = make_trainer(kind, tiny_llama(), two_length_lm_data(), _lm_collate, two_length_lm_data(),
                               compute_metrics=_recorder(seen), output_dir=str(tmp_path / kind), **fields)
        runs[kind] = trainer.evaluate(), trainer.predict(two_length_lm_data()), seen
    (m_ours, p_ours, seen_ours), (m_theirs, p_theirs, seen_theirs) = runs["optsched"], runs["hf"]
    assert_same_logs([m_ours, p_ours.metrics], [m_theirs, p_theirs.metrics])
    _assert_same_eval_predictions(seen_ours, seen_theirs)  # 4 batches of evaluate(), 4 of predict()
    assert len(seen_ours) == 8 and seen_ours[3][0].shape[0] == 1
    for ours, theirs in ((p_ours.predictions, p_theirs.predictions), (p_ours.label_ids, p_theirs.label_ids)):
        assert isinstance(ours, list) and len(ours) == len(theirs) == 4
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ours, theirs))


# ---- include_num_input_tokens_seen with a resume and a short last accumulation ----------------------------


@pytest.mark.parametrize("ignore_data_skip", [False, True])
def test_the_tokens_count_goes_on_across_a_resume_as_transformers_counts(tmp_path, ignore_data_skip):
    fields = dict(num_train_epochs=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
                  save_strategy="steps", save_steps=4, disable_tqdm=True, use_cpu=True, seed=0,
                  include_num_input_tokens_seen="non_padding")
    # 10 samples of 8 positions, 3 to 7 of them real: batch 2 and GA 2 make 5 batches an epoch, the last step
    # of each epoch one batch
    runs = {}
    for kind in ("optsched", "hf"):
        out = tmp_path / kind
        for resume in (None, "checkpoint-4"):  # step 4: one step into epoch 1
            torch.manual_seed(0)
            trainer = make_trainer(kind, tiny_llama(), padded_lm_data(10), output_dir=str(out), **fields,
                                   **({"ignore_data_skip": ignore_data_skip} if resume else {}))
            trainer.train(resume_from_checkpoint=resume and str(out / resume))
            runs[kind, resume] = trainer
    for resume in (None, "checkpoint-4"):
        ours, theirs = runs["optsched", resume], runs["hf", resume]
        assert_same_logs(ours.state.log_history, theirs.state.log_history)
        assert _same_weights(ours.model, theirs.model)
    # 50 real tokens an epoch; with ignore_data_skip the 2 steps after the resume train epoch 1's first 4
    # batches again (38 tokens) in place of its last 3 (34)
    assert runs["optsched", None].state.num_input_tokens_seen == 100
    assert runs["optsched", "checkpoint-4"].state.num_input_tokens_seen == 100 + 4 * ignore_data_skip


# ---- log_level with callbacks that log; full_determinism with DataLoader workers --------------------------


class _Talks(TrainerCallback):
    """Logs through a logger under optsched's (INFO) and through the application's own (WARNING)."""

    def on_evaluate(self, args, state, control, **kwargs):
        logging.getLogger("optsched.user_callback").info("evaluated at step %d", state.global_step)

    def on_save(self, args, state, control, **kwargs):
        logging.getLogger("my_app").warning("saved step %d", state.global_step)


@pytest.mark.parametrize("log_level", ["info", "error"])
def test_log_level_holds_for_callbacks_under_optsched_logger_only(tmp_path, caplog, log_level):
    caplog.set_level(logging.DEBUG)  # the root's handler takes everything; the loggers' levels decide
    optsched_logger = logging.getLogger("optsched")
    before = optsched_logger.level
    torch.manual_seed(0)
    trainer = make_trainer("optsched", tiny_bert(), _classification_data(13, 0), None, _classification_data(7, 1),
                           callbacks=[_Talks()], **_best_fields(tmp_path, max_steps=4, eval_on_start=True,
                                                                log_level=log_level, save_total_limit=1))
    trainer.train()
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    evaluated = [m for name, m in messages if name == "optsched.user_callback"]
    assert evaluated == ([f"evaluated at step {step}" for step in (0, 2, 4)] if log_level == "info" else [])
    assert ("Loading best model from" in " ".join(m for _, m in messages)) is (log_level == "info")
    # the application's own logger: never optsched's to set
    assert [m for name, m in messages if name == "my_app"] == ["saved step 2", "saved step 4"]
    assert optsched_logger.level == before  # put back when train() returned


class _RandomlyMasked(torch.utils.data.Dataset):
    """masked_lm_data with 30% of the input tokens set to 0 at random, drawn in the DataLoader's worker."""

    def __init__(self):
        self.data = masked_lm_data(12)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ids = self.data[i]["input_ids"].clone()
        ids[torch.rand(ids.shape) < 0.3] = 0
        return {"input_ids": ids, "labels": self.data[i]["labels"]}


@pytest.fixture
def process_settings():
    """full_determinism changes torch's flags and the environment for the process: put back after the test."""
    import os

    from optsched.trainer.determinism import FULL_DETERMINISM_ENVIRONMENT

    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    environment = {name: os.environ.get(name) for name in FULL_DETERMINISM_ENVIRONMENT}
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
def test_full_determinism_with_dataloader_workers_repeats_a_run(tmp_path, process_settings, persistent):
    # the workers' random masking (their seeds from data_seed), whatever the global RNG holds before the Trainer
    # is built; another data_seed masks otherwise (the control)
    weights = []
    for data_seed, noise in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(0)
        model = tiny_llama()
        torch.manual_seed(100 + noise)
        trainer = Trainer(model, TrainingArguments(
            output_dir=str(tmp_path / f"{data_seed}-{noise}"), max_steps=6, per_device_train_batch_size=2,
            learning_rate=1e-2, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, data_seed=data_seed,
            full_determinism=True,
            dataloader_num_workers=2, dataloader_persistent_workers=persistent), train_dataset=_RandomlyMasked())
        trainer.train()
        weights.append(model)
    assert torch.are_deterministic_algorithms_enabled()
    assert _same_weights(weights[0], weights[1]) and not _same_weights(weights[0], weights[2])


# ---- under DDP: the combination judged riskiest ---------------------------------------------------------


@pytest.mark.slow
def test_two_processes_combine_the_features_as_one_process_does(tmp_path):
    """ddp_interactions_worker.py: 2 processes x batch 2 against 1 x batch 4 (the same samples a step), with
    GA 2 and a one-batch last step an epoch, label smoothing (the count over both processes in training,
    each eval batch's own in evaluation), the tokens count (summed over the processes), eval_on_start and
    batch_eval_metrics with inputs and losses on 5 eval samples (the last step one process without a
    batch), and the best checkpoint loaded on both: the same logs, metrics, best step and weights."""
    from ddp_interactions_worker import result, run

    run_torchrun("ddp_interactions_worker.py", str(tmp_path / "ddp"))
    ranks = [json.loads((tmp_path / "ddp" / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # logs, best checkpoint and its weights on both processes
    single = json.loads(json.dumps(result(run(str(tmp_path / "single"), batch_size=4))))
    ddp = ranks[0]
    assert ddp["best"] == single["best"] == "checkpoint-4"
    assert ddp["tokens"] == single["tokens"] == 12 * 8 * 3  # every element of 3 epochs
    assert len(ddp["logs"]) == len(single["logs"]) == 11  # 4 evaluations, 6 steps, the run's metrics
    for ours, one in zip(ddp["logs"], single["logs"]):
        assert ours.keys() == one.keys()
        for key, value in one.items():
            exact = key in ("step", "epoch", "num_input_tokens_seen", "eval_labels", "eval_input_elements",
                            "eval_accuracy")
            assert ours[key] == (value if exact else pytest.approx(value, rel=1e-5)), (one["step"], key)
    assert [e["eval_labels"] for e in single["logs"] if "eval_labels" in e] == [15.0] * 4
    # the gradients summed in another order: Adam's normalisation makes the ulps of a tiny gradient 3e-6
    for name, values in single["weights"].items():
        torch.testing.assert_close(torch.tensor(ddp["weights"][name]), torch.tensor(values), rtol=1e-4, atol=1e-5)
