"""compute_metrics / preprocess_logits_for_metrics / predict(): transformers' Trainer semantics.

Parity tests run transformers' Trainer on the same model copy, data and arguments, and compare the
metrics (all keys but the timing ones), the predictions and the label ids.
"""

from __future__ import annotations

import copy

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
from trainer_helpers import tiny_bert, tiny_llama

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


def both_trainers(model_fn, data, tmp_path, **kwargs):
    """(optsched's, transformers') Trainers on two copies of one model, same args and eval data."""
    import transformers

    torch.manual_seed(0)
    model = model_fn()
    fields = dict(per_device_eval_batch_size=4, use_cpu=True, disable_tqdm=True)
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
    import socket
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from ddp_metrics_worker import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(here / "ddp_metrics_worker.py"), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    os.makedirs(tmp_path / "single")
    run(str(tmp_path / "single"))
    ddp, single = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "single"))
    assert ddp["eval_n"] == single["eval_n"] == 7  # each sample once
    assert ddp.pop("eval_loss") == pytest.approx(single.pop("eval_loss"), rel=1e-6)
    assert ddp.pop("eval_weighted") == pytest.approx(single.pop("eval_weighted"), rel=1e-6)  # dataset order
    assert ddp == single
    a, b = (np.load(tmp_path / d / "predictions.npz") for d in ("ddp", "single"))
    assert a["predictions"].shape == b["predictions"].shape == (7, 5)
    np.testing.assert_array_equal(a["label_ids"], b["label_ids"])
    np.testing.assert_allclose(a["predictions"], b["predictions"], rtol=1e-6)
    assert (b["label_ids"][:4, 3:] == -100).all() and b["label_ids"][6, 0] == 6
