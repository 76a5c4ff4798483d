"""compute_metrics / preprocess_logits_for_metrics / predict(): transformers' Trainer semantics.

Parity tests run transformers' Trainer on the same model copy, data and arguments, and compare the
metrics (all keys but the timing ones), the predictions and the label ids.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from optsched import EvalPrediction, PredictionOutput, Trainer, TrainingArguments
from optsched.trainer.predictions import (
    denumpify_detensorize,
    gather_in_dataset_order,
    nested_concat,
    prefix_metrics,
)
from trainer_helpers import run_torchrun, tiny_bert, tiny_llama

TIMING = ("runtime", "samples_per_second", "steps_per_second")


def accuracy(eval_pred):
    preds, labels = eval_pred  # tuple unpacking, as users' metric code does
    if preds.ndim > labels.ndim:
        preds = preds.argmax(-1)
    mask = labels != -100
    return {"accuracy": np.float64((preds[mask] == labels[mask]).mean()), "count": np.int64(mask.sum())}


def argmax_logits(logits, labels):
    return logits.argmax(-1)


def classification_data(n: int = 12, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (length,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


def lm_data(n: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    data = []
    for i in range(n):
        ids = torch.randint(0, 50, (8,), generator=g)
        labels = ids.clone()
        labels[3 + i % 4:] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


def two_length_lm_data(n: int = 7) -> list[dict[str, torch.Tensor]]:
    """Causal-LM samples 0-3 of 6 tokens and 4+ of 8, labels masked from a different place in each: with
    batches of 2, two lengths to pad and a last batch of one sample."""
    g = torch.Generator().manual_seed(4)
    data = []
    for i in range(n):
        ids = torch.randint(0, 50, (6 if i < 4 else 8,), generator=g)
        labels = ids.clone()
        labels[2 + i % 3:] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


def both_trainers(model_fn, data, tmp_path, fields=None, **kwargs):
    """(optsched's, transformers') Trainers on two copies of one model, same args (``fields`` over
    batches of 4 on the CPU) and eval data."""
    import transformers

    torch.manual_seed(0)
    model = model_fn()
    fields = {"per_device_eval_batch_size": 4, "use_cpu": True, "disable_tqdm": True, **(fields or {})}
    ours = Trainer(copy.deepcopy(model), TrainingArguments(output_dir=str(tmp_path / "o"), **fields),
                   eval_dataset=data, **kwargs)
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "h"), report_to="none", **fields)
    theirs = transformers.Trainer(copy.deepcopy(model), hf_args, eval_dataset=data, **kwargs)
    return ours, theirs


def assert_same_metrics(ours: dict, theirs: dict, prefix: str = "eval"):
    drop = {f"{prefix}_{t}" for t in TIMING} | {"epoch", f"{prefix}_model_preparation_time"}
    a = {k: v for k, v in ours.items() if k not in drop}
    b = {k: v for k, v in theirs.items() if k not in drop}
    assert set(a) == set(b)
    loss = f"{prefix}_loss"
    if loss in b:
        assert a.pop(loss) == pytest.approx(b.pop(loss), rel=1e-6)
    assert a == b
    for k, v in a.items():
        assert type(v) is type(b[k]), k  # JSON-plain Python numbers, as transformers' denumpify_detensorize


@pytest.mark.parametrize("preprocess", [None, argmax_logits])
def test_bert_classification_metrics_and_predictions_match_transformers(tmp_path, preprocess):
    data = classification_data()
    ours, theirs = both_trainers(tiny_bert, data, tmp_path, compute_metrics=accuracy,
                                 preprocess_logits_for_metrics=preprocess)
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    assert "eval_accuracy" in m_ours and "eval_count" in m_ours and m_ours["eval_count"] == 12
    assert_same_metrics(m_ours, m_theirs)
    assert set(m_ours) >= {f"eval_{t}" for t in TIMING}

    p_ours, p_theirs = ours.predict(data), theirs.predict(data)
    assert isinstance(p_ours, PredictionOutput)
    assert isinstance(p_ours.predictions, np.ndarray) and isinstance(p_ours.label_ids, np.ndarray)
    assert p_ours.predictions.shape == p_theirs.predictions.shape == ((12, 2) if preprocess is None else (12,))
    np.testing.assert_allclose(p_ours.predictions, p_theirs.predictions, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(p_ours.label_ids, p_theirs.label_ids)
    assert_same_metrics(p_ours.metrics, p_theirs.metrics, prefix="test")


def test_causal_lm_3d_logits_match_transformers(tmp_path):
    data = lm_data()
    ours, theirs = both_trainers(tiny_llama, data, tmp_path, compute_metrics=accuracy)
    assert_same_metrics(ours.evaluate(), theirs.evaluate())
    p_ours, p_theirs = ours.predict(data), theirs.predict(data)
    assert p_ours.predictions.shape == p_theirs.predictions.shape == (12, 8, 50)
    np.testing.assert_allclose(p_ours.predictions, p_theirs.predictions, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p_ours.label_ids, p_theirs.label_ids)


def lm_data_with_unlabelled_batches(unlabelled: set[int], n: int = 12) -> list[dict[str, torch.Tensor]]:
    """:func:`lm_data` with every label of the samples in ``unlabelled`` set to -100: a batch of those only
    has a NaN loss (the mean over no token)."""
    data = lm_data(n)
    for i in unlabelled:
        data[i]["labels"] = torch.full_like(data[i]["labels"], -100)
    return data


@pytest.mark.parametrize("nan_filter", [True, False])
@pytest.mark.parametrize("unlabelled", [{4, 5, 6, 7}, set(range(12))], ids=["one-batch", "every-batch"])
def test_batches_with_a_nan_loss_are_left_out_of_eval_loss_as_in_transformers(tmp_path, nan_filter, unlabelled):
    # batches of 4: the second holds no label; logging_nan_inf_filter (default True) leaves its NaN out of
    # eval_loss, unless every batch is NaN; False keeps it
    data = lm_data_with_unlabelled_batches(unlabelled)
    some_labelled = len(unlabelled) < len(data)
    ours, theirs = both_trainers(tiny_llama, data, tmp_path, {"logging_nan_inf_filter": nan_filter},
                                 compute_metrics=accuracy if some_labelled else None)  # else accuracy is NaN
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    finite = nan_filter and some_labelled
    assert math.isfinite(m_ours["eval_loss"]) is finite
    if finite:
        assert_same_metrics(m_ours, m_theirs)
        kept = [d for i, d in enumerate(data) if i not in unlabelled]
        only_kept, _ = both_trainers(tiny_llama, kept, tmp_path / "kept")
        assert m_ours["eval_loss"] == pytest.approx(only_kept.evaluate()["eval_loss"], rel=1e-12)
    else:
        assert math.isnan(m_theirs["eval_loss"])
        assert_same_metrics({**m_ours, "eval_loss": 0.0}, {**m_theirs, "eval_loss": 0.0})


def test_causal_lm_with_preprocess_matches_transformers(tmp_path):
    data = lm_data()
    ours, theirs = both_trainers(tiny_llama, data, tmp_path, compute_metrics=accuracy,
                                 preprocess_logits_for_metrics=argmax_logits)
    assert_same_metrics(ours.evaluate(), theirs.evaluate())


def test_without_compute_metrics_no_prediction_is_collected(tmp_path, monkeypatch):
    import optsched.trainer.evaluation as evaluation

    def boom(*a, **k):
        raise AssertionError("predictions collected without compute_metrics")

    monkeypatch.setattr(evaluation, "PredictionCollector", boom)
    t = Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True), eval_dataset=classification_data())
    assert set(t.evaluate()) - {"epoch"} == {"eval_loss", *(f"eval_{k}" for k in TIMING)}


def test_metrics_reach_callbacks_log_history_and_best_metric(tmp_path):
    from optsched import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(dict(metrics))

    data = classification_data()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=2, eval_strategy="steps", eval_steps=1,
                             metric_for_best_model="accuracy", per_device_train_batch_size=4, disable_tqdm=True,
                             save_strategy="no")
    t = Trainer(tiny_bert(), args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy, callbacks=[Spy])
    t.train()
    assert len(seen) == 2 and all("eval_accuracy" in m for m in seen)
    assert [h["eval_accuracy"] for h in t.state.log_history if "eval_accuracy" in h] == [m["eval_accuracy"] for m in seen]
    assert t.state.best_metric == max(m["eval_accuracy"] for m in seen)


def test_predict_without_labels_gives_predictions_only(tmp_path):
    data = [{"input_ids": d["input_ids"]} for d in classification_data(6)]
    calls = []
    t = Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                compute_metrics=lambda p: calls.append(p) or {})
    out = t.predict(data)
    assert out.label_ids is None and out.predictions.shape == (6, 2) and not calls
    assert "test_loss" not in out.metrics and "test_runtime" in out.metrics


class _Targets(torch.nn.Module):
    """Labels under another key: find_labels sees none named '*label*'."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x, targets=None):
        logits = self.linear(x)
        out = {"logits": logits}
        if targets is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, targets)
        return out


def test_label_names_and_prediction_loss_only_fields(tmp_path):
    data = [{"x": torch.full((3,), float(i)), "targets": torch.tensor(i % 2)} for i in range(6)]
    calls = []
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_names=["targets"])
    t = Trainer(_Targets(), args, compute_metrics=lambda p: calls.append(p) or {"n": len(p.label_ids)})
    assert t.label_names == ["targets"]
    out = t.predict(data)
    assert out.label_ids.tolist() == [0, 1, 0, 1, 0, 1] and out.metrics["test_n"] == 6 and len(calls) == 1
    # the default (find_labels) finds no '*label*' argument here: no label_ids, no metrics
    default = Trainer(_Targets(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                      compute_metrics=lambda p: calls.append(p) or {})
    assert default.label_names == ["labels"] and default.predict(data).label_ids is None and len(calls) == 1
    # prediction_loss_only: the loss, no predictions collected, compute_metrics not called
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_names=["targets"],
                             prediction_loss_only=True)
    t = Trainer(_Targets(), args, eval_dataset=data, compute_metrics=lambda p: calls.append(p) or {})
    metrics = t.evaluate()
    assert "eval_loss" in metrics and len(calls) == 1
    with pytest.raises(TypeError, match="label_names must be a list of non-empty strings"):
        TrainingArguments(label_names=[1])


# ---- helpers: concatenation, gathering, EvalPrediction ---------------------------------------------------


def test_nested_concat_pads_with_minus_100_like_transformers():
    from transformers.trainer_pt_utils import nested_concat as hf_nested_concat

    a, b = np.arange(6).reshape(2, 3), np.arange(8).reshape(2, 4) + 10
    ours = nested_concat(a, b)
    assert ours.shape == (4, 4) and (ours[:2, 3] == -100).all()
    np.testing.assert_array_equal(ours, hf_nested_concat(a, b, padding_index=-100))
    x3, y3 = np.ones((1, 2, 5)), np.zeros((2, 3, 5))
    ours_t, theirs_t = nested_concat((x3, a[:1]), (y3, b)), hf_nested_concat((x3, a[:1]), (y3, b), -100)
    assert isinstance(ours_t, tuple) and ours_t[0].shape == (3, 3, 5)
    for x, y in zip(ours_t, theirs_t, strict=True):
        np.testing.assert_array_equal(x, y)
    ta, tb = torch.arange(3), torch.arange(2)
    np.testing.assert_array_equal(nested_concat(ta, tb), np.array([0, 1, 2, 0, 1]))
    np.testing.assert_array_equal(nested_concat(None, tb), tb.numpy())


def test_variable_length_batches_are_padded_in_evaluate(tmp_path):
    # batches of length 5 then 8: the first batch's labels padded with -100 to 8
    data = lm_data(8)
    data = [{k: v[:5] for k, v in d.items()} if i < 4 else d for i, d in enumerate(data)]
    torch.manual_seed(0)
    t = Trainer(tiny_llama(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=4))
    out = t.predict(data)
    assert out.predictions.shape == (8, 8, 50) and out.label_ids.shape == (8, 8)
    assert (out.label_ids[:4, 5:] == -100).all() and (out.predictions[:4, 5:] == -100).all()


def test_gathered_ranks_are_interleaved_in_dataset_order():
    class Ctx:
        enabled, world_size = False, 1

    assert gather_in_dataset_order("x", Ctx()) == "x"
    from optsched.trainer.predictions import _nested_interleave

    # 5 samples over 2 ranks: rank 0 has 0, 2, 4 (length 2), rank 1 has 1, 3 (length 3)
    r0 = np.array([[0, 0], [2, 2], [4, 4]])
    r1 = np.array([[1, 1, 1], [3, 3, 3]])
    out = _nested_interleave([r0, r1], -100)
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2, 3, 4])
    assert out.shape == (5, 3) and out[0, 2] == -100 and out[1, 2] == 1
    assert _nested_interleave([np.array([7]), None], -100).tolist() == [7]


def test_a_list_of_objects_is_gathered_item_by_item_and_a_list_of_arrays_by_position():
    from optsched.trainer.predictions import _nested_interleave

    # rank 0 holds samples 0, 2, 4 and rank 1 samples 1, 3: one dict per sample (a detection collator's labels)
    r0 = [{"boxes": np.full((k, 4), float(i))} for i, k in ((0, 1), (2, 3), (4, 2))]
    r1 = [{"boxes": np.full((k, 4), float(i))} for i, k in ((1, 2), (3, 1))]
    for objects in (False, True):
        out = _nested_interleave([r0, r1], -100, objects)
        assert [d["boxes"][0, 0] for d in out] == [0, 1, 2, 3, 4]
        assert [len(d["boxes"]) for d in out] == [1, 2, 3, 1, 2]
    # a list of arrays (one per layer, 2 samples each): position by position, unless eval_use_gather_object
    layers0, layers1 = [np.array([0.0, 2.0]), np.array([10.0, 12.0])], [np.array([1.0, 3.0]), np.array([11.0, 13.0])]
    by_layer = _nested_interleave([layers0, layers1], -100)
    assert [a.tolist() for a in by_layer] == [[0, 1, 2, 3], [10, 11, 12, 13]]
    as_objects = _nested_interleave([layers0, layers1], -100, objects=True)
    assert [a.tolist() for a in as_objects] == [[0, 2], [1, 3], [10, 12], [11, 13]]  # transformers' object gather


def test_eval_prediction_behaves_as_transformers():
    p, labels = np.zeros(2), np.ones(2)
    ep = EvalPrediction(predictions=p, label_ids=labels)
    a, b = ep
    assert a is p and b is labels and ep[0] is p and ep.label_ids is labels and len(ep) == 2
    with pytest.raises(IndexError):
        ep[2]
    assert len(list(EvalPrediction(p, labels, losses=p))) == 3
    out = PredictionOutput(p, labels, {"x": 1.0})
    preds, label_ids, metrics = out
    assert out.metrics == {"x": 1.0} and preds is p


def test_denumpify_and_prefix():
    m = denumpify_detensorize({"a": np.float32(0.5), "b": torch.tensor(2), "c": [np.int64(3)], "d": "s"})
    assert m == {"a": 0.5, "b": 2, "c": [3], "d": "s"} and type(m["a"]) is float and type(m["c"][0]) is int
    assert prefix_metrics({"accuracy": 1, "eval_f1": 2}, "eval") == {"eval_f1": 2, "eval_accuracy": 1}


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["compute_metrics", "preprocess_logits_for_metrics"])
def test_a_non_callable_is_refused_naming_the_argument(tmp_path, model_factory, name):
    with pytest.raises(TypeError, match=rf"{name} must be callable or None, got str 'accuracy'.*accepted: f\("):
        Trainer(model_factory(), TrainingArguments(output_dir=str(tmp_path)), **{name: "accuracy"})


@pytest.mark.parametrize("returned, what", [(None, "NoneType None"), (0.5, "float 0.5"), ({1: 0.5}, "non-string")])
def test_compute_metrics_returning_a_non_mapping_is_refused(tmp_path, returned, what):
    t = Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True), eval_dataset=classification_data(4),
                compute_metrics=lambda p: returned)
    with pytest.raises(TypeError, match=rf"compute_metrics \(.*\) returned {what}.*accepted"):
        t.evaluate()


def test_predict_without_a_dataset_is_refused(tmp_path, model_factory):
    t = Trainer(model_factory(), TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"predict\(test_dataset=None\).*accepted"):
        t.predict(None)


# ---- DDP ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_metrics_and_predictions_of_one(tmp_path):
    import json
    import os

    from ddp_metrics_worker import run

    run_torchrun("ddp_metrics_worker.py", str(tmp_path / "ddp"))
    os.makedirs(tmp_path / "single")
    run(str(tmp_path / "single"))
    def read(name):
        return [json.loads((tmp_path / d / f"{name}.json").read_text()) for d in ("ddp", "single")]

    ddp, single = read("metrics")
    assert ddp == read("metrics_accumulated")[0]  # eval_accumulation_steps=1 changes nothing, under DDP too
    assert ddp["eval_n"] == single["eval_n"] == ddp["eval_losses"] == 7  # each sample once
    assert ddp.pop("eval_loss") == pytest.approx(single.pop("eval_loss"), rel=1e-6)
    assert ddp.pop("eval_weighted") == pytest.approx(single.pop("eval_weighted"), rel=1e-6)  # dataset order
    assert ddp == single  # inputs_weighted: the inputs gathered in dataset order, exactly
    # batch_eval_metrics: each step's batches of both processes, in dataset order; 4 steps, the last one
    # with rank 0's sample only
    ddp, single = read("metrics_batch")
    assert ddp.pop("eval_flags") == [False] * 3 + [True] and single.pop("eval_flags") == [False] * 6 + [True]
    assert ddp.pop("eval_loss") == pytest.approx(single.pop("eval_loss"), rel=1e-6)
    assert ddp.pop("eval_weighted") == pytest.approx(single.pop("eval_weighted"), rel=1e-6)
    assert ddp == single and ddp["eval_n"] == ddp["eval_losses"] == 7
    a, b = (np.load(tmp_path / d / "predictions.npz") for d in ("ddp", "single"))
    assert a["predictions"].shape == b["predictions"].shape == (7, 5)
    np.testing.assert_array_equal(a["label_ids"], b["label_ids"])
    np.testing.assert_allclose(a["predictions"], b["predictions"], rtol=1e-6)
    assert (b["label_ids"][:4, 3:] == -100).all() and b["label_ids"][6, 0] == 6


# ---- include_for_metrics, eval_accumulation_steps, ignore_keys ------------------------------------------


def two_length_classification_data(n: int = 7) -> list[dict[str, torch.Tensor]]:
    """Samples 0-3 of 5 tokens, 4+ of 8: the collected input_ids need -100 padding."""
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 50, (5 if i < 4 else 8,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(n)]


def recording_metrics(seen: list):
    """compute_metrics that keeps every EvalPrediction and returns order-sensitive sums of what it got."""

    def compute_metrics(eval_pred):
        seen.append(eval_pred)
        out = accuracy((eval_pred.predictions, eval_pred.label_ids))
        if eval_pred.inputs is not None:
            inputs = np.where(eval_pred.inputs == -100, 0, eval_pred.inputs)
            out["inputs_weighted"] = float((np.arange(1, len(inputs) + 1)[:, None] * inputs).sum())
        if eval_pred.losses is not None:
            out["losses_weighted"] = float((np.arange(1, len(eval_pred.losses) + 1) * eval_pred.losses).sum())
        return out

    return compute_metrics


def assert_same_eval_predictions(ours, theirs):
    """The same elements (so the same tuple unpacking), attribute by attribute, bitwise."""
    assert len(ours.elements) == len(theirs.elements)
    for name in ("predictions", "label_ids", "inputs", "losses"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert type(a) is type(b) and a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)
    for a, b in zip(ours, theirs, strict=True):
        assert a is not None and b is not None and a.shape == b.shape


@pytest.mark.parametrize(("model_fn", "data_fn", "include"), [
    (tiny_llama, two_length_lm_data, ["inputs"]),
    (tiny_llama, two_length_lm_data, ["loss"]),
    (tiny_llama, two_length_lm_data, ["inputs", "loss"]),
    (tiny_bert, two_length_classification_data, ["loss", "inputs"]),
], ids=["llama-inputs", "llama-loss", "llama-both", "bert-both"])
def test_include_for_metrics_gives_transformers_eval_prediction(tmp_path, model_fn, data_fn, include):
    # 7 samples in batches of 2: sequences of two lengths, a last batch of one sample
    data = data_fn()
    seen = []
    ours, theirs = both_trainers(model_fn, data, tmp_path, fields={"include_for_metrics": include,
                                                                   "per_device_eval_batch_size": 2},
                                 compute_metrics=recording_metrics(seen))
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    assert_same_metrics(m_ours, m_theirs)
    assert ("eval_inputs_weighted" in m_ours, "eval_losses_weighted" in m_ours) == ("inputs" in include, "loss" in include)
    assert len(seen) == 2
    assert_same_eval_predictions(*seen)
    ep = seen[0]
    assert len(ep.elements) == 2 + len(include)  # predictions, label_ids, then inputs, then losses
    if "inputs" in include:
        assert ep.inputs.shape[:2] == (7, 8) and (ep.inputs[:4, 5 if model_fn is tiny_bert else 6:] == -100).all()
        np.testing.assert_array_equal(ep.inputs[6, :8], data[6]["input_ids"].numpy())
    if "loss" in include:
        assert ep.losses.shape == (7,) and ep.losses.dtype == np.float32
        assert ep.losses[0] == ep.losses[1] and ep.losses[6] != ep.losses[5]  # the batch's loss, per sample
        assert float(ep.losses.mean()) == pytest.approx(m_ours["eval_loss"], rel=1e-6)
    seen.clear()
    p_ours, p_theirs = ours.predict(data), theirs.predict(data)
    assert_same_metrics(p_ours.metrics, p_theirs.metrics, prefix="test")
    assert_same_eval_predictions(*seen)


def test_eval_prediction_unpacks_as_transformers_with_inputs_and_losses():
    from transformers.trainer_utils import EvalPrediction as HFEvalPrediction

    p, labels, inputs, losses = np.zeros(2), np.ones(2), np.full(2, 2), np.full(2, 3.0)
    for kwargs in ({"inputs": inputs}, {"losses": losses}, {"inputs": inputs, "losses": losses}):
        ours, theirs = EvalPrediction(p, labels, **kwargs), HFEvalPrediction(p, labels, **kwargs)
        assert [id(e) for e in ours] == [id(e) for e in theirs]
        assert [id(ours[i]) for i in range(len(ours.elements))] == [id(theirs[i]) for i in range(len(theirs.elements))]
        for ep in (ours, theirs):
            with pytest.raises(ValueError, match="too many values to unpack"):
                preds, label_ids = ep
            with pytest.raises(IndexError):
                ep[len(ep.elements)]
    *_, last = EvalPrediction(p, labels, inputs=inputs, losses=losses)
    assert last is losses  # losses after inputs, whatever the keyword order


def test_eval_accumulation_steps_changes_no_result(tmp_path):
    # transformers moves the collected tensors to the CPU every N steps; optsched moves each batch's: the
    # field is accepted for the API and every N gives what transformers gives
    data = two_length_lm_data()
    runs = []
    for steps in (None, 1, 3):
        seen = []
        ours, theirs = both_trainers(tiny_llama, data, tmp_path, fields={"eval_accumulation_steps": steps,
                                     "per_device_eval_batch_size": 2, "include_for_metrics": ["inputs", "loss"]},
                                     compute_metrics=recording_metrics(seen))
        m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
        assert ours.args.eval_accumulation_steps == theirs.args.eval_accumulation_steps == steps
        assert_same_metrics(m_ours, m_theirs)
        assert_same_eval_predictions(*seen)
        p = ours.predict(data)
        runs.append((m_ours, seen[0], p))
    for m, ep, p in runs[1:]:
        assert_same_metrics(m, runs[0][0])
        assert_same_eval_predictions(ep, runs[0][1])
        np.testing.assert_array_equal(p.predictions, runs[0][2].predictions)


def bert_with_hidden_states(keys_to_ignore=None):
    """Tiny BERT whose outputs carry hidden_states beside the logits (and, when given, a config that
    names keys_to_ignore_at_inference)."""

    def make():
        model = tiny_bert()
        model.config.output_hidden_states = True
        if keys_to_ignore is not None:
            model.config.keys_to_ignore_at_inference = keys_to_ignore
        return model

    return make


def output_summary(eval_pred):
    """How many outputs the predictions hold, and an order-sensitive sum of all of them."""
    preds = eval_pred.predictions
    leaves = [preds] if isinstance(preds, np.ndarray) else list(preds[:1]) + list(preds[1])
    weighted = sum(float((np.arange(1, len(x) + 1).reshape((-1,) + (1,) * (x.ndim - 1)) * x).sum()) for x in leaves)
    return {"outputs": 1 if isinstance(preds, np.ndarray) else len(preds), "weighted": weighted}


@pytest.mark.parametrize(("ignore_keys", "config_keys", "outputs"), [
    (None, None, 2),  # no keys_to_ignore_at_inference: transformers' ["past_key_values"], hidden_states kept
    (["hidden_states"], None, 1),
    (None, ["hidden_states"], 1),  # the config's keys when ignore_keys is None
    ([], ["hidden_states"], 2),  # an explicit empty list ignores nothing
])
def test_ignore_keys_in_evaluate_and_predict_match_transformers(tmp_path, ignore_keys, config_keys, outputs):
    data = two_length_classification_data()
    ours, theirs = both_trainers(bert_with_hidden_states(config_keys), data, tmp_path, compute_metrics=output_summary,
                                 fields={"per_device_eval_batch_size": 2})
    m_ours, m_theirs = ours.evaluate(ignore_keys=ignore_keys), theirs.evaluate(ignore_keys=ignore_keys)
    assert m_ours["eval_outputs"] == outputs
    assert_same_metrics(m_ours, m_theirs)
    p_ours, p_theirs = ours.predict(data, ignore_keys=ignore_keys), theirs.predict(data, ignore_keys=ignore_keys)
    assert_same_metrics(p_ours.metrics, p_theirs.metrics, prefix="test")
    if outputs == 1:
        np.testing.assert_array_equal(p_ours.predictions, p_theirs.predictions)
    else:  # (logits, (embeddings, layer 1)), as transformers nests them
        logits, hidden = p_ours.predictions
        assert isinstance(hidden, tuple) and len(hidden) == 2 and hidden[0].shape == (7, 8, 16)
        np.testing.assert_array_equal(logits, p_theirs.predictions[0])
        for a, b in zip(hidden, p_theirs.predictions[1], strict=True):
            np.testing.assert_array_equal(a, b)


def test_ignore_keys_for_eval_reaches_the_evaluations_during_training(tmp_path):
    import transformers

    data = two_length_classification_data(8)
    fields = {"max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "per_device_train_batch_size": 4,
              "per_device_eval_batch_size": 4, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
              "learning_rate": 1e-2}
    data = [{"input_ids": d["input_ids"][:5], "labels": d["labels"]} for d in data]  # one length for training
    torch.manual_seed(0)
    model = bert_with_hidden_states()()
    ours = Trainer(copy.deepcopy(model), TrainingArguments(output_dir=str(tmp_path / "o"), **fields),
                   train_dataset=data, eval_dataset=data, compute_metrics=output_summary)
    theirs = transformers.Trainer(copy.deepcopy(model), transformers.TrainingArguments(
        output_dir=str(tmp_path / "h"), report_to="none", **fields), train_dataset=data, eval_dataset=data,
        compute_metrics=output_summary)
    ours.train(ignore_keys_for_eval=["hidden_states"])
    theirs.train(ignore_keys_for_eval=["hidden_states"])
    evals = [[h for h in t.state.log_history if "eval_outputs" in h] for t in (ours, theirs)]
    assert [h["eval_outputs"] for h in evals[0]] == [h["eval_outputs"] for h in evals[1]] == [1, 1]
    for a, b in zip(*evals, strict=True):
        assert_same_metrics(a, b)
    ours.train()  # a later train() without it evaluates with the config's default again: hidden_states kept
    assert [h["eval_outputs"] for h in ours.state.log_history if "eval_outputs" in h][-1] == 2


@pytest.mark.parametrize("call", ["evaluate", "predict", "train"])
def test_ignore_keys_not_a_list_is_refused(tmp_path, call):
    data = two_length_classification_data(4)
    t = Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1,
                                               per_device_train_batch_size=4, per_device_eval_batch_size=4),
                train_dataset=data, eval_dataset=data)
    name = "ignore_keys_for_eval" if call == "train" else "ignore_keys"
    run = {"evaluate": lambda v: t.evaluate(ignore_keys=v), "predict": lambda v: t.predict(data, ignore_keys=v),
           "train": lambda v: t.train(ignore_keys_for_eval=v)}[call]
    with pytest.raises(TypeError, match=rf"{name} must be a list of model output names.*got str 'hidden_states' "
                                        r"\(accepted: \['hidden_states'\]\)"):
        run("hidden_states")  # a string would ignore its characters
    with pytest.raises(TypeError, match=rf"{name} must be a list.*got list \[1\]"):
        run([1])
    assert t.state.global_step == 0


# ---- eval_do_concat_batches --------------------------------------------------------------------------------


def assert_same_nested(ours, theirs, name="predictions"):
    """The same structure (arrays, tuples, per-batch lists, dicts) and the same arrays, dtypes included, bitwise."""
    assert type(ours) is type(theirs), name
    if isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), name
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_nested(a, b, f"{name}[{i}]")
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            assert_same_nested(ours[key], theirs[key], f"{name}[{key!r}]")
    elif theirs is not None:
        assert ours.dtype == theirs.dtype, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def batch_counts(seen: list):
    """compute_metrics that keeps every EvalPrediction and counts its rows (arrays or per-batch lists)."""

    def compute_metrics(eval_pred):
        seen.append(eval_pred)
        labels = eval_pred.label_ids
        return {"rows": sum(map(len, labels)) if isinstance(labels, list) else len(labels),
                "batches": len(labels) if isinstance(labels, list) else 0}

    return compute_metrics


@pytest.mark.parametrize("concat", [False, True], ids=["per-batch", "concatenated"])
@pytest.mark.parametrize(("model_fn", "data_fn"), [
    (tiny_llama, two_length_lm_data),
    (bert_with_hidden_states(), two_length_classification_data),  # (logits, (embeddings, layer 1)) per batch
], ids=["llama", "bert-hidden-states"])
def test_eval_do_concat_batches_gives_transformers_eval_prediction_and_prediction_output(tmp_path, model_fn, data_fn,
                                                                                       concat):
    # 7 samples in batches of 2: 4 batches, of two sequence lengths, the last one of one sample
    data = data_fn()
    seen = []
    ours, theirs = both_trainers(model_fn, data, tmp_path, compute_metrics=batch_counts(seen), fields={
        "eval_do_concat_batches": concat, "include_for_metrics": ["inputs", "loss"], "per_device_eval_batch_size": 2})
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    assert_same_metrics(m_ours, m_theirs)
    assert (m_ours["eval_rows"], m_ours["eval_batches"]) == (7, 0 if concat else 4)
    for name in ("predictions", "label_ids", "inputs", "losses"):
        assert_same_nested(getattr(seen[0], name), getattr(seen[1], name), name)
    if not concat:
        assert [len(b) for b in seen[0].label_ids] == [2, 2, 2, 1] and [len(b) for b in seen[0].losses] == [2, 2, 2, 1]
        assert [b.shape[1] for b in seen[0].inputs] == [data[i]["input_ids"].shape[0] for i in (0, 2, 4, 6)]
    p_ours, p_theirs = ours.predict(data), theirs.predict(data)
    assert_same_metrics(p_ours.metrics, p_theirs.metrics, prefix="test")
    assert_same_nested(p_ours.predictions, p_theirs.predictions)
    assert_same_nested(p_ours.label_ids, p_theirs.label_ids, "label_ids")


@pytest.mark.slow
def test_per_batch_lists_under_two_processes_are_transformers(tmp_path):
    # ddp_eval_batches_worker.py: 7 samples of 2 to 6 positions, 2 processes x batch 2. transformers' entry k
    # gathers step k's batches of both processes (padded across them with -100, its duplicate of sample 0
    # completing the last step dropped): rows 0-3, then 4-6. optsched's processes read other rows of them
    # (every other sample), gathered back into the same entries; the test fails if they are concatenated
    import pickle

    run_torchrun("ddp_eval_batches_worker.py", str(tmp_path))
    with open(tmp_path / "eval_batches.pkl", "rb") as f:
        results = pickle.load(f)
    ours, theirs = results["optsched"], results["hf"]
    assert [len(b) for b in theirs["label_ids"]] == [4, 3]
    # labels as a list of one dict per sample (a detection collator's), transformers with
    # eval_use_gather_object=True: the same dicts in the same entries, in the dataset's order (optsched combined
    # the ranks' lists position by position before, mixing two samples' boxes in one dict)
    objects = results["objects"]
    assert [[len(d["class_labels"]) for d in entry] for entry in objects["hf"]] == [[2, 3, 4, 5], [3, 2, 6]]
    assert_same_nested(objects["optsched"], objects["hf"], "object labels")
    assert_same_nested(objects["optsched, no switch"], objects["hf"], "object labels without the switch")
    assert_same_nested(ours["label_ids"], theirs["label_ids"], "label_ids")
    # each sample's batch loss: the batches differ (so do the losses), the rows per entry do not
    assert [len(b) for b in ours["losses"]] == [len(b) for b in theirs["losses"]] == [4, 3]
    for name in ("predictions", "inputs"):  # the padding: the collator's (0, its output) or -100, by batch
        assert len(ours[name]) == len(theirs[name]) == 2
        for a, b, labels in zip(ours[name], theirs[name], theirs["label_ids"]):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a[labels != -100], b[labels != -100], err_msg=name)
