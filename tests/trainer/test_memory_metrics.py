"""skip_memory_metrics=False (optsched.trainer.memory_metrics): transformers' memory metrics, measured with the
kernel's high-water mark instead of a busy thread."""

from __future__ import annotations

import threading

import pytest
import torch

from optsched import TrainerCallback
from optsched.trainer import memory_metrics
from trainer_helpers import TinyRegressor, make_regression_data, make_trainer

HOG = 50_000_000  # float32 elements: 200 MB held for a moment at step 2


class Hog(TrainerCallback):
    """Holds 200 MB for a moment during training and notes the threads alive then."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            x = torch.ones(HOG)
            x += 1  # touched: resident
            self.threads = [t.name for t in threading.enumerate()]
            del x


def _run(kind, tmp_path, **fields):
    torch.manual_seed(0)
    hog = Hog()
    trainer = make_trainer(kind, TinyRegressor(), make_regression_data(32), eval_dataset=make_regression_data(8),
                           callbacks=[hog], output_dir=str(tmp_path / kind), max_steps=4, save_strategy="no",
                           disable_tqdm=True, **fields)
    output = trainer.train()
    return trainer, hog, output.metrics, trainer.evaluate(), trainer.predict(make_regression_data(8)).metrics


def _memory_keys(metrics):
    return sorted(k for k in metrics if "_mem_" in k)


def test_the_metrics_and_where_they_go_are_transformers(tmp_path):
    """train: init's and train's deltas and before_init_mem_cpu, in TrainOutput.metrics and the log; evaluate():
    eval's, returned only; predict(): test's. The 200 MB held during training is the train stage's peak."""
    runs = {kind: _run(kind, tmp_path, skip_memory_metrics=False) for kind in ("optsched", "hf")}
    for kind, (trainer, _, train, evaluation, prediction) in runs.items():
        assert _memory_keys(train) == ["before_init_mem_cpu", "init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta",
                                       "train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta"], kind
        assert _memory_keys(evaluation) == ["eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"], kind
        assert _memory_keys(prediction) == ["test_mem_cpu_alloc_delta", "test_mem_cpu_peaked_delta"], kind
        logged = [_memory_keys(entry) for entry in trainer.state.log_history]
        assert [keys for keys in logged if keys] == [_memory_keys(train)], kind  # eval's are not logged
        assert 0.95 * HOG * 4 <= train["train_mem_cpu_peaked_delta"] <= 1.2 * HOG * 4, kind
        assert all(isinstance(train[k], int) for k in _memory_keys(train)), kind


def test_skipped_by_default(tmp_path):
    _, _, train, evaluation, prediction = _run("optsched", tmp_path)
    assert not _memory_keys(train) and not _memory_keys(evaluation) and not _memory_keys(prediction)


def test_no_thread_watches_the_memory_where_the_kernel_keeps_the_peak(tmp_path):
    trainer, hog, train, _, _ = _run("optsched", tmp_path, skip_memory_metrics=False)
    assert train["train_mem_cpu_peaked_delta"] >= 0.95 * HOG * 4
    assert hog.threads and "optsched-memory-peak" not in hog.threads


def test_without_the_kernels_peak_a_sampling_thread_finds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_metrics, "_CLEAR_REFS", str(tmp_path / "no" / "clear_refs"))
    trainer, hog, train, _, _ = _run("optsched", tmp_path, skip_memory_metrics=False)
    assert "optsched-memory-peak" in hog.threads
    assert train["train_mem_cpu_peaked_delta"] >= 0.95 * HOG * 4
    assert "optsched-memory-peak" not in [t.name for t in threading.enumerate()]  # stopped with the stage


def test_a_failed_train_leaves_no_stage_open(tmp_path):
    class Fails(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    trainer = make_trainer("optsched", TinyRegressor(), make_regression_data(16), eval_dataset=make_regression_data(8),
                           callbacks=[Fails()], output_dir=str(tmp_path), max_steps=2, save_strategy="no",
                           disable_tqdm=True, skip_memory_metrics=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert _memory_keys(trainer.evaluate()) == ["before_init_mem_cpu", "eval_mem_cpu_alloc_delta",
                                                "eval_mem_cpu_peaked_delta", "init_mem_cpu_alloc_delta",
                                                "init_mem_cpu_peaked_delta"]


def test_an_evaluation_during_training_is_part_of_the_train_stage(tmp_path):
    trainer = make_trainer("optsched", TinyRegressor(), make_regression_data(16), eval_dataset=make_regression_data(8),
                           output_dir=str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2,
                           save_strategy="no", disable_tqdm=True, skip_memory_metrics=False)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 2 and not any(_memory_keys(entry) for entry in evaluations)
