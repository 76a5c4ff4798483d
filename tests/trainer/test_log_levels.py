"""log_level / log_level_replica / log_on_each_node (optsched.trainer.log_levels): transformers' levels, on the
optsched logger, during the Trainer's calls only."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer.distributed import DistributedContext
from optsched.trainer.log_levels import optsched_log_level, process_log_level
from trainer_helpers import PlainRegressor, make_trainer

transformers = pytest.importorskip("transformers")

OPTSCHED = logging.getLogger("optsched")
LEVEL_NAMES = ("detail", "debug", "info", "warning", "error", "critical", "passive")


@pytest.fixture(autouse=True)
def restore_loggers():
    """Both libraries' logger levels and handlers are process-wide: put them back after each test."""
    verbosity = transformers.logging.get_verbosity()
    level, handlers = OPTSCHED.level, list(OPTSCHED.handlers)
    yield
    transformers.logging.set_verbosity(verbosity)
    OPTSCHED.setLevel(level)
    OPTSCHED.handlers[:] = handlers


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(3, generator=g), "labels": torch.randn((), generator=g)} for _ in range(n)]


def _fields(tmp_path, **extra):
    return dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                disable_tqdm=True, use_cpu=True, **extra)


def _trainer(tmp_path, **extra):
    return Trainer(PlainRegressor(), TrainingArguments(**_fields(tmp_path, **extra)), train_dataset=_data())


def test_process_level_is_transformers_get_process_log_level(tmp_path, monkeypatch):
    """Every level name, both log_on_each_node settings, and the processes that do and do not log (the main
    one, a node's first process, another): transformers' level, "passive" standing for its current verbosity."""
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    transformers.logging.set_verbosity(5)  # no named level: "passive" shows as 5 on transformers' side
    cases = itertools.product(LEVEL_NAMES, ("warning", "passive", "debug"), (True, False), ((0, 0), (0, 3), (1, 1)))
    for level, replica, on_each_node, (local_rank, rank) in cases:
        monkeypatch.setattr(type(hf), "local_process_index", property(lambda self, r=local_rank: r))
        monkeypatch.setattr(type(hf), "process_index", property(lambda self, r=rank: r))
        hf.log_level, hf.log_level_replica, hf.log_on_each_node = level, replica, on_each_node
        ours = TrainingArguments(log_level=level, log_level_replica=replica, log_on_each_node=on_each_node)
        got = process_log_level(ours, local_rank=local_rank, rank=rank)
        assert (5 if got is None else got) == hf.get_process_log_level(), (level, replica, on_each_node, local_rank, rank)


class _LevelsSeen:
    """Records the logger level in effect when the Trainer is built (on_init_end) and trains (on_train_begin)."""

    def __init__(self, read):
        self.read, self.seen = read, []

    def on_init_end(self, args, state, control, **kwargs):
        self.seen.append(self.read())

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append(self.read())


@pytest.mark.parametrize("level", ["detail", "debug", "info", "error", "passive"])
def test_the_level_in_effect_is_transformers_trainers_and_restored_after(tmp_path, level):
    """transformers' Trainer's library logger and optsched's Trainer's logger are at the same level while
    training; afterwards transformers' stays there, optsched's is back to its own (NOTSET: the root's)."""
    before = {"hf": transformers.logging.get_verbosity(), "optsched": OPTSCHED.getEffectiveLevel()}
    during, after = {}, {}
    for name, read, base in (("hf", transformers.logging.get_verbosity, transformers.TrainerCallback),
                             ("optsched", OPTSCHED.getEffectiveLevel, object)):
        recorder = type("Recorder", (_LevelsSeen, base), {})(read)
        trainer = make_trainer(name, PlainRegressor(), _data(), **_fields(tmp_path / name, log_level=level))
        trainer.add_callback(recorder)
        trainer.train()
        during[name], after[name] = recorder.seen, read()
    named = {"detail": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}
    assert during["hf"] == [before["hf"] if level == "passive" else named[level]]
    assert during["optsched"] == [before["optsched"] if level == "passive" else named[level]]
    assert after["hf"] == during["hf"][0]
    assert after["optsched"] == before["optsched"] and OPTSCHED.level == logging.NOTSET


def test_the_constructor_logs_at_the_level(tmp_path, caplog):
    recorder = type("Recorder", (_LevelsSeen,), {})(OPTSCHED.getEffectiveLevel)
    Trainer(PlainRegressor(), TrainingArguments(**_fields(tmp_path, log_level="debug")), train_dataset=_data(),
            callbacks=[recorder])
    assert recorder.seen == [logging.DEBUG]
    # the optimizer's param groups are logged at DEBUG as the constructor builds them
    assert any(r.name == "optsched.params.groups" and r.levelno == logging.DEBUG for r in caplog.records)
    caplog.clear()
    _trainer(tmp_path)  # passive: the root logger's WARNING
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]


def test_a_quieter_level_silences_the_constructors_warning(tmp_path, caplog):
    for level, shown in (("passive", True), ("warning", True), ("error", False)):
        caplog.clear()
        Trainer(PlainRegressor(), TrainingArguments(**{**_fields(tmp_path, log_level=level), "report_to": "wandb"}),
                train_dataset=_data())
        assert ("no reporting integrations" in caplog.text) is shown, level


def _metrics_table_logged(trainer, caplog):
    caplog.clear()
    trainer.log_metrics("train", {"train_loss": 0.5})
    return "***** train metrics *****" in caplog.text


def test_info_shows_log_metrics_table(tmp_path, caplog):
    assert not _metrics_table_logged(_trainer(tmp_path), caplog)  # passive: root's WARNING hides INFO
    trainer = _trainer(tmp_path, log_level="info")
    assert _metrics_table_logged(trainer, caplog)
    assert OPTSCHED.level == logging.NOTSET
    trainer.args.log_level = "warning"  # read at each call
    assert not _metrics_table_logged(trainer, caplog)


@pytest.mark.parametrize(("rank", "local_rank", "on_each_node", "logs_at_main_level"), [
    (0, 0, True, True),
    (3, 0, True, True),     # a node's first process
    (3, 0, False, False),   # ... which is a replica when only the global rank 0 logs
    (1, 1, True, False),
])
def test_replicas_log_at_log_level_replica(tmp_path, caplog, rank, local_rank, on_each_node, logs_at_main_level):
    """An application that set the optsched logger to DEBUG: the process that logs keeps it (passive), the
    others are quieted to WARNING (transformers' default log_level_replica) unless log_level_replica says more."""
    OPTSCHED.setLevel(logging.DEBUG)
    for replica, replica_shows in (("warning", False), ("debug", True)):
        trainer = _trainer(tmp_path, log_level_replica=replica, log_on_each_node=on_each_node)
        trainer.dist = DistributedContext(rank=rank, local_rank=local_rank, world_size=4)
        trainer.optimizer = None
        caplog.clear()
        trainer.create_optimizer()  # logs its param groups at DEBUG
        shown = any(r.name == "optsched.params.groups" for r in caplog.records)
        assert shown is (True if logs_at_main_level else replica_shows), replica
        assert OPTSCHED.level == logging.DEBUG


def test_without_a_handler_the_records_go_to_stderr_during_the_call(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # an application that configured no logging
    assert not OPTSCHED.hasHandlers()
    trainer = _trainer(tmp_path, log_level="info")
    capsys.readouterr()
    trainer.log_metrics("train", {"train_loss": 0.5})
    assert capsys.readouterr().err == "***** train metrics *****\n  train_loss = 0.5\n"
    assert not OPTSCHED.handlers and OPTSCHED.level == logging.NOTSET
    trainer.args.log_level = "passive"  # Python's last-resort handler: warnings and above only
    trainer.log_metrics("train", {"train_loss": 0.5})
    assert capsys.readouterr().err == ""


def test_the_level_is_restored_when_the_call_raises(tmp_path):
    OPTSCHED.setLevel(logging.ERROR)
    trainer = _trainer(tmp_path, log_level="debug")
    with pytest.raises(ValueError):
        trainer.evaluate()  # no eval_dataset
    assert OPTSCHED.level == logging.ERROR and OPTSCHED.handlers == []
    with optsched_log_level(logging.INFO):  # nested calls (train -> evaluate) restore the enclosing level
        with optsched_log_level(logging.DEBUG):
            assert OPTSCHED.level == logging.DEBUG
        assert OPTSCHED.level == logging.INFO
    assert OPTSCHED.level == logging.ERROR
