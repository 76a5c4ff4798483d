"""batch_eval_metrics: compute_metrics(eval_pred, compute_result) on every eval batch, as transformers' Trainer.

Parity tests run transformers' Trainer on a copy of the same tiny model and data (7 samples in batches of
2: two sequence lengths, a last batch of one sample) and compare every call: the compute_result flags, the
tensors passed (bitwise), and the metrics of the last call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.batch_metrics import check_compute_result_parameter, lockstep_batches
from test_metrics import (
    assert_same_metrics,
    both_trainers,
    two_length_classification_data,
    two_length_lm_data,
)
from trainer_helpers import tiny_bert, tiny_llama


def accumulating_metrics(calls: list):
    """A batch-wise compute_metrics: keeps each call, sums order-sensitive statistics, returns them (and
    starts over) when compute_result is True, None before."""
    totals = {}

    def compute_metrics(eval_pred, compute_result=False):
        calls.append((eval_pred, compute_result))
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if preds.ndim > labels.ndim:
            preds = preds.argmax(-1)
        mask = labels != -100
        offset = totals.get("n", 0)
        totals["n"] = offset + len(labels)
        totals["correct"] = totals.get("correct", 0) + int((preds[mask] == labels[mask]).sum())
        if eval_pred.losses is not None:
            weights = torch.arange(offset + 1, offset + len(eval_pred.losses) + 1)
            totals["losses_weighted"] = totals.get("losses_weighted", 0.0) + float((weights * eval_pred.losses).sum())
        if eval_pred.inputs is not None:
            ids = eval_pred.inputs["input_ids"]
            weights = torch.arange(offset + 1, offset + len(ids) + 1)[:, None]
            totals["inputs_weighted"] = totals.get("inputs_weighted", 0) + int((weights * ids).sum())
        if not compute_result:
            return None
        result = dict(totals)
        totals.clear()
        return result

    return compute_metrics


def assert_same_calls(ours: list, theirs: list):
    assert [flag for _, flag in ours] == [flag for _, flag in theirs]
    for (a, _), (b, _) in zip(ours, theirs, strict=True):
        assert len(a.elements) == len(b.elements)
        for name in ("predictions", "label_ids", "losses"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if y is not None:
                assert isinstance(x, torch.Tensor) and x.dtype == y.dtype, name
                assert torch.equal(x, y), name
        assert (a.inputs is None) == (b.inputs is None)
        if b.inputs is not None:  # the whole batch, as transformers passes it
            assert list(a.inputs) == list(b.inputs)
            assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in b.inputs)


@pytest.mark.parametrize(("model_fn", "data_fn", "include"), [
    (tiny_llama, two_length_lm_data, ["inputs", "loss"]),
    (tiny_llama, two_length_lm_data, []),
    (tiny_bert, two_length_classification_data, ["loss"]),
], ids=["llama-inputs-loss", "llama", "bert-loss"])
def test_batch_eval_metrics_calls_as_transformers(tmp_path, model_fn, data_fn, include):
    data = data_fn()
    calls = []
    ours, theirs = both_trainers(model_fn, data, tmp_path, compute_metrics=accumulating_metrics(calls), fields={
        "batch_eval_metrics": True, "include_for_metrics": include, "per_device_eval_batch_size": 2})
    m_ours = ours.evaluate()
    ours_calls, calls[:] = list(calls), []
    m_theirs = theirs.evaluate()
    assert [flag for _, flag in ours_calls] == [False, False, False, True]
    assert_same_calls(ours_calls, calls)
    assert m_ours["eval_n"] == 7 and ("eval_losses_weighted" in m_ours) == ("loss" in include)
    assert_same_metrics(m_ours, m_theirs)
    if "inputs" in include:
        assert list(ours_calls[0][0].inputs) == ["input_ids", "labels"] and ours_calls[3][0].inputs["input_ids"].shape == (1, 8)

    calls.clear()
    p_ours = ours.predict(data)
    ours_calls, calls[:] = list(calls), []
    p_theirs = theirs.predict(data)
    assert_same_calls(ours_calls, calls)
    assert_same_metrics(p_ours.metrics, p_theirs.metrics, prefix="test")
    # predict() still collects the predictions (transformers' rule), padded to the longer batches
    assert p_ours.predictions.shape == p_theirs.predictions.shape
    np.testing.assert_array_equal(p_ours.predictions, p_theirs.predictions)
    np.testing.assert_array_equal(p_ours.label_ids, p_theirs.label_ids)


def test_a_batch_evaluation_keeps_no_prediction(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=2, batch_eval_metrics=True)
    t = Trainer(tiny_llama(), args, compute_metrics=accumulating_metrics([]))
    loader = t.get_eval_dataloader(two_length_lm_data())
    evaluated = t.evaluation_loop(loader, "Evaluation")
    assert evaluated.predictions is None and evaluated.label_ids is None and evaluated.metrics["eval_n"] == 7
    predicted = t.evaluation_loop(loader, "Prediction")
    assert predicted.predictions.shape == (7, 8, 50) and predicted.metrics["eval_n"] == 7


def test_compute_metrics_without_compute_result_is_refused_as_transformers(tmp_path):
    import transformers

    def plain(eval_pred):
        return {}

    with pytest.raises(ValueError, match="compute_result"):
        transformers.Trainer(tiny_bert(), transformers.TrainingArguments(
            output_dir=str(tmp_path), batch_eval_metrics=True, report_to="none", use_cpu=True), compute_metrics=plain)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, batch_eval_metrics=True)
    with pytest.raises(ValueError, match=r"batch_eval_metrics=True calls compute_metrics\(eval_pred, compute_result=.*"
                                         r"\(.*plain\) has no compute_result parameter\. Accepted: def compute_metrics"):
        Trainer(tiny_bert(), args, compute_metrics=plain)
    check_compute_result_parameter(lambda eval_pred, compute_result: {})
    Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True), compute_metrics=plain)  # off: fine


def test_a_last_call_returning_no_mapping_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, batch_eval_metrics=True, per_device_eval_batch_size=2)
    t = Trainer(tiny_bert(), args, eval_dataset=two_length_classification_data(),
                compute_metrics=lambda eval_pred, compute_result: None)
    with pytest.raises(TypeError, match=r"compute_metrics \(.*\) returned NoneType None.*accepted"):
        t.evaluate()


def test_lockstep_batches_flags_the_last_batch_of_one_process():
    class Single:
        enabled = False

    assert list(lockstep_batches(iter("abc"), Single(), torch.device("cpu"))) == [("a", False), ("b", False), ("c", True)]
    assert list(lockstep_batches([], Single(), torch.device("cpu"))) == []
