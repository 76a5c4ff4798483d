"""Checkpoints are flushed to disk on a worker thread before older ones are deleted
(optsched.trainer.checkpoint.make_durable, CheckpointMixin._finish_save_in_background)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from optsched import Trainer, TrainingArguments
from optsched.trainer import checkpoint as ckpt
from trainer_helpers import TinyRegressor, make_regression_data


def _args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=8, save_steps=2,
                    save_total_limit=2, disable_tqdm=True, report_to="none", logging_steps=100)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_make_durable_flushes_every_file_the_directory_and_its_parent(tmp_path, monkeypatch):
    directory = tmp_path / "run" / "checkpoint-3"
    directory.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (directory / name).write_bytes(b"x" * 10)
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    ckpt.make_durable(directory)
    expected = [str(directory / n) for n in ("model.safetensors", "optimizer.pt", "trainer_state.json")]
    assert flushed == [*expected, str(directory), str(directory.parent)]


def test_older_checkpoints_are_deleted_only_after_the_new_one_is_flushed(tmp_path, monkeypatch):
    seen: list[tuple[str, list[str]]] = []
    real = ckpt.make_durable

    def recording(directory):
        real(directory)
        seen.append((Path(directory).name, [p.name for p in ckpt.list_checkpoints(Path(directory).parent)]))

    monkeypatch.setattr(ckpt, "make_durable", recording)
    trainer = Trainer(TinyRegressor(), _args(tmp_path), train_dataset=make_regression_data(64))
    trainer.train()
    # each flush ran while the older checkpoints were still there; the rotation came after it
    assert seen == [
        ("checkpoint-2", ["checkpoint-2"]),
        ("checkpoint-4", ["checkpoint-2", "checkpoint-4"]),
        ("checkpoint-6", ["checkpoint-2", "checkpoint-4", "checkpoint-6"]),
        ("checkpoint-8", ["checkpoint-4", "checkpoint-6", "checkpoint-8"]),
    ]
    # train() returned after the last flush and rotation
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["checkpoint-6", "checkpoint-8"]


def test_a_failed_flush_deletes_nothing_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def failing(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "make_durable", failing)
    trainer = Trainer(TinyRegressor(), _args(tmp_path), train_dataset=make_regression_data(64))
    with caplog.at_level(logging.ERROR):
        trainer.train()
    assert trainer.state.global_step == 8
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "out")]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]  # limit 2 not applied
    assert "checkpoint-8 could not be flushed to disk" in caplog.text
    assert "No space left on device" in caplog.text and "older checkpoints are kept" in caplog.text


def test_train_waits_for_the_flush_even_when_it_raises(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(ckpt, "make_durable", lambda d: calls.append(Path(d).name))

    class Stop(Exception):
        pass

    class Boom(Trainer):
        def _maybe_log_save_evaluate(self, model):
            super()._maybe_log_save_evaluate(model)
            if self.state.global_step == 4:
                raise Stop

    trainer = Boom(TinyRegressor(), _args(tmp_path), train_dataset=make_regression_data(64))
    with pytest.raises(Stop):
        trainer.train()
    assert calls == ["checkpoint-2", "checkpoint-4"]
    assert getattr(trainer, "_save_finisher", None) is None  # joined before train() raised


def test_with_a_limit_of_one_the_flushed_checkpoint_survives_until_the_next_is_flushed(tmp_path, monkeypatch):
    """The previous save's rotation ends before the next checkpoint is published, so it never counts an
    unflushed checkpoint among the ones to keep."""
    durable: set[str] = set()
    on_disk_when_published: list[list[str]] = []
    real_flush, real_staged = ckpt.make_durable, ckpt.staged_checkpoint

    def flush(directory):
        time.sleep(0.05)  # a slow disk: the next step's save comes while this flush still runs
        real_flush(directory)
        durable.add(Path(directory).name)

    from contextlib import contextmanager

    @contextmanager
    def staged(final, ctx=None, **kwargs):
        with real_staged(final, ctx, **kwargs) as tmp:
            yield tmp
        on_disk_when_published.append(sorted(p.name for p in ckpt.list_checkpoints(Path(final).parent)))
        # every checkpoint that remains, except the one just published, is a flushed one
        assert set(on_disk_when_published[-1]) - {Path(final).name} <= durable

    monkeypatch.setattr(ckpt, "make_durable", flush)
    monkeypatch.setattr(ckpt, "staged_checkpoint", staged)
    trainer = Trainer(TinyRegressor(), _args(tmp_path, save_total_limit=1), train_dataset=make_regression_data(64))
    trainer.train()
    assert on_disk_when_published == [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"],
                                      ["checkpoint-4", "checkpoint-6"], ["checkpoint-6", "checkpoint-8"]]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["checkpoint-8"]
