"""auto_find_batch_size (optsched.trainer.auto_batch_size): train again with a 0.9x batch after running out of
memory, as transformers' Trainer does, each new attempt starting clean.

The device's memory is played by a model that raises ``torch.OutOfMemoryError`` (CUDA's message) for a batch
larger than a limit, so the search runs on the CPU, in both Trainers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref

import pytest
import torch

from optsched.trainer.auto_batch_size import is_out_of_memory, next_batch_size
from trainer_helpers import TinyRegressor, assert_same_logs, make_regression_data, make_trainer

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


class FitsUpTo(torch.nn.Module):
    """TinyRegressor that runs out of memory for a batch larger than ``limit``, from forward call ``after`` on
    (0: from the first). Records each call's batch, and a weak reference to a tensor of each failed call."""

    def __init__(self, limit: int, after: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyRegressor()
        self.limit, self.after = limit, after
        self.batches: list[int] = []
        self.failed_tensors: list[weakref.ref] = []
        self.alive_at_retry: list[int] = []

    def forward(self, x, labels=None):
        self.batches.append(x.shape[0])
        self.alive_at_retry.append(sum(ref() is not None for ref in self.failed_tensors))
        if len(self.batches) > self.after and x.shape[0] > self.limit:
            activations = torch.ones(x.shape[0], 1024)  # what the failed step holds when it fails
            self.failed_tensors.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(CUDA_OOM)
        return self.inner(x=x, labels=labels)


def _fields(tmp_path, kind, **extra):
    return {"output_dir": str(tmp_path / kind), "per_device_train_batch_size": 16, "auto_find_batch_size": True,
            "num_train_epochs": 2, "logging_steps": 1, "seed": 0, "learning_rate": 1e-2, "save_strategy": "steps",
            "save_steps": 4, "disable_tqdm": True, **extra}


def _train(kind, tmp_path, model, data, **extra):
    trainer = make_trainer(kind, model, data, **_fields(tmp_path, kind, **extra))
    return trainer, trainer.train()


@pytest.mark.parametrize(
    "message",
    [CUDA_OOM, "HIP out of memory. Tried to allocate", "XPU out of memory.", "MPS backend out of memory (MPS allocated",
     "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
     "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8",
     "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed"],
)
def test_out_of_memory_errors_are_recognised_as_accelerate_recognises_them(message):
    from accelerate.utils.memory import should_reduce_batch_size

    for exc in (RuntimeError(message), torch.OutOfMemoryError(message)):
        assert is_out_of_memory(exc) and should_reduce_batch_size(exc)


@pytest.mark.parametrize("exc", [ValueError(CUDA_OOM), RuntimeError(CUDA_OOM, "second argument"),
                                 RuntimeError("shape mismatch"), MemoryError()])
def test_other_errors_are_not_out_of_memory(exc):
    from accelerate.utils.memory import should_reduce_batch_size

    assert not is_out_of_memory(exc) and not should_reduce_batch_size(exc)


def test_a_runtime_error_without_a_message_is_not_out_of_memory():
    assert not is_out_of_memory(RuntimeError(3))  # accelerate's test raises TypeError on it


def test_the_batch_shrinks_by_a_tenth_as_accelerate_shrinks_it():
    sizes, size = [], 16
    while size:
        sizes.append(size)
        size = next_batch_size(size)
    assert sizes == [16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]


def test_a_first_step_out_of_memory_trains_as_transformers_trainer_bitwise(tmp_path, caplog):
    """16, 14 and 12 run out of memory, 10 fits: both Trainers try the same sizes, then train the same run
    (weights bitwise, logs equal) and save train_batch_size=10 in trainer_state.json."""
    data = make_regression_data(64)
    runs = {}
    for kind in ("optsched", "hf"):
        model = FitsUpTo(10)
        with caplog.at_level(logging.WARNING, logger="optsched"):
            trainer, output = _train(kind, tmp_path, model, data, max_steps=8)
        saved = json.loads((tmp_path / kind / "checkpoint-4" / "trainer_state.json").read_text())
        runs[kind] = model, output, trainer.state.log_history, saved["train_batch_size"]
    (ours, out, logs, saved), (theirs, out_hf, logs_hf, saved_hf) = runs["optsched"], runs["hf"]
    assert ours.batches[:4] == theirs.batches[:4] == [16, 14, 12, 10]
    assert ours.batches[3:] == theirs.batches[3:] and set(ours.batches[3:]) == {10, 4}  # 6 x 10 + 4 an epoch
    assert out.global_step == out_hf.global_step == 8
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_logs(logs, logs_hf)
    assert saved == saved_hf == 10
    assert [r.getMessage() for r in caplog.records if "auto_find_batch_size" in r.getMessage()] == [
        f"auto_find_batch_size: out of memory with per_device_train_batch_size={a} at step 1; training again "
        f"with {b}." for a, b in ((16, 14), (14, 12), (12, 10))]


def test_the_failed_steps_tensors_are_freed_before_the_next_attempt(tmp_path):
    model = FitsUpTo(10)
    _train("optsched", tmp_path, model, make_regression_data(64), max_steps=2)
    assert len(model.failed_tensors) == 3
    assert model.alive_at_retry[1:4] == [0, 0, 0]  # each failed step's tensors gone when the next one starts


def test_a_resume_starts_from_the_checkpoints_batch_as_transformers_does(tmp_path):
    """The batch found is not searched again: a resume with auto_find_batch_size starts from trainer_state.json's
    train_batch_size (10) although per_device_train_batch_size says 16, and continues the uninterrupted run
    exactly; transformers' Trainer resuming the same checkpoint ends with the same weights."""
    data = make_regression_data(64)
    uninterrupted = FitsUpTo(10)
    _train("optsched", tmp_path / "first", uninterrupted, data, max_steps=8)
    checkpoint = tmp_path / "first" / "optsched" / "checkpoint-4"
    for kind in ("optsched", "hf"):
        model = FitsUpTo(10)
        trainer = make_trainer(kind, model, data, **_fields(tmp_path / "resumed", kind, max_steps=8))
        trainer.train(resume_from_checkpoint=str(checkpoint))
        assert model.batches == [10, 10, 4, 10], kind  # steps 5-8 (an epoch is 6 full batches and one of 4)
        for a, b in zip(model.state_dict().values(), uninterrupted.state_dict().values()):
            assert torch.equal(a, b), kind


def test_a_later_out_of_memory_starts_again_with_a_fresh_optimizer_and_schedule(tmp_path, caplog):
    """A longer batch fails at step 3, after 2 applied steps: the weights keep them (named in the warning),
    but the optimizer is made again and the schedule starts over, where transformers' Trainer goes on with the
    first attempt's optimizer state. The second attempt's logs are those of a run from those weights."""
    data = make_regression_data(64)
    model = FitsUpTo(10, after=2)
    with caplog.at_level(logging.WARNING, logger="optsched"):
        trainer, output = _train("optsched", tmp_path, model, data, max_steps=5, save_strategy="no")
    warnings = [r.getMessage() for r in caplog.records if "auto_find_batch_size" in r.getMessage()]
    assert warnings == [
        "auto_find_batch_size: out of memory with per_device_train_batch_size=16 at step 3; training again with 14. "
        "The model keeps the 2 optimizer step(s) already applied (resume from a checkpoint, or set "
        "per_device_train_batch_size and start again, for a clean run).",
        "auto_find_batch_size: out of memory with per_device_train_batch_size=14 at step 1; training again with 12.",
        "auto_find_batch_size: out of memory with per_device_train_batch_size=12 at step 1; training again with 10.",
    ]
    assert model.batches[:6] == [16, 16, 16, 14, 12, 10] and output.global_step == 5
    steps = {int(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {5}  # the fresh optimizer's moments count this attempt's 5 steps only
    assert [h["learning_rate"] for h in trainer.state.log_history if "loss" in h][0] == 1e-2  # step 0's lr


def test_a_given_optimizer_and_scheduler_go_back_to_where_they_were(tmp_path):
    data = make_regression_data(64)
    model = FitsUpTo(10, after=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = make_trainer("optsched", model, data, **_fields(tmp_path, "optsched", max_steps=5, save_strategy="no"))
    trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
    trainer.train()
    assert trainer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    assert {int(s["step"]) for s in optimizer.state_dict()["state"].values()} == {5}
    assert scheduler.last_epoch == 5
    assert [h["learning_rate"] for h in trainer.state.log_history if "loss" in h] == [
        1e-2 * (1.0 / (1 + s)) for s in range(5)]  # LambdaLR's base_lr * factor, from step 0 again


def test_out_of_memory_at_a_batch_of_one_says_what_was_tried(tmp_path):
    model = FitsUpTo(0)
    with pytest.raises(RuntimeError, match=r"out of memory with every per-device batch size tried \(4, 3, 2, 1\)") as info:
        _train("optsched", tmp_path, model, make_regression_data(16), per_device_train_batch_size=4, max_steps=2)
    assert isinstance(info.value.__cause__, RuntimeError) and CUDA_OOM in str(info.value.__cause__)


def test_another_error_is_raised_at_once_without_a_retry(tmp_path):
    class Broken(FitsUpTo):
        def forward(self, x, labels=None):
            self.batches.append(x.shape[0])
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x4 and 5x16)")

    model = Broken(10)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _train("optsched", tmp_path, model, make_regression_data(32))
    assert model.batches == [16]


def test_without_the_field_out_of_memory_is_raised_as_it_is(tmp_path):
    model = FitsUpTo(10)
    with pytest.raises(torch.OutOfMemoryError):
        _train("optsched", tmp_path, model, make_regression_data(32), auto_find_batch_size=False)
    assert model.batches == [16]


def test_it_is_refused_with_several_processes(tmp_path):
    trainer = make_trainer("optsched", FitsUpTo(10), make_regression_data(32), **_fields(tmp_path, "optsched"))
    trainer.dist = dataclasses.replace(trainer.dist, world_size=2)
    with pytest.raises(ValueError, match="auto_find_batch_size=True with 2 processes"):
        trainer.train()
