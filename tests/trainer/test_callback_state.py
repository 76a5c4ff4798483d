"""Stateful callbacks (optsched.trainer.callback_state): their states in trainer_state.json with transformers'
layout, and restore_callback_states_from_checkpoint, against transformers' Trainer and across the two."""

from __future__ import annotations

import json

import pytest
import torch

from optsched import TrainerCallback
from optsched.trainer.callback_state import ExportableState, export_states, is_exportable, restore_states
from optsched.trainer.state import TrainerControl
from trainer_helpers import PlainRegressor, make_trainer

transformers = pytest.importorskip("transformers")

# an evaluation every step, a checkpoint every 2: with a threshold no improvement reaches, the patience
# counter is 0 after the first evaluation (no best metric yet) and grows by one at each later one
FIELDS = dict(max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=2, logging_steps=1,
              metric_for_best_model="loss", per_device_train_batch_size=2, per_device_eval_batch_size=4,
              learning_rate=1e-2, disable_tqdm=True, use_cpu=True, seed=0)


def _data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]


def _early_stopping(trainer):
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "EarlyStoppingCallback"]
    return callback


def _train(kind: str, out, resume=None, **fields):
    """``kind``'s Trainer with a fresh EarlyStoppingCallback, trained (resumed from ``resume``)."""
    torch.manual_seed(0)
    trainer = make_trainer(kind, PlainRegressor(), _data(), eval_dataset=_data(4), output_dir=str(out), **FIELDS,
                           **fields)
    trainer.add_callback(transformers.EarlyStoppingCallback(early_stopping_patience=100,
                                                            early_stopping_threshold=1e9))
    trainer.train(resume_from_checkpoint=resume and str(resume))
    return trainer


def _saved(out, step: int) -> dict:
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["stateful_callbacks"]


def test_trainer_state_holds_the_callback_states_as_transformers_writes_them(tmp_path):
    ours, theirs = (_train(kind, tmp_path / kind) for kind in ("optsched", "hf"))
    assert _early_stopping(ours).early_stopping_patience_counter == _early_stopping(theirs).early_stopping_patience_counter == 3
    for step, counter in ((2, 1), (4, 3)):
        saved = _saved(tmp_path / "optsched", step)
        assert saved == _saved(tmp_path / "hf", step)
        assert saved["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": counter}
        assert set(saved["TrainerControl"]["args"]) == {"should_training_stop", "should_epoch_stop", "should_save",
                                                         "should_evaluate", "should_log"}


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize(("writer", "resumer"), [("optsched", "optsched"), ("hf", "hf"), ("hf", "optsched"),
                                                  ("optsched", "hf")])
def test_the_patience_counter_survives_a_resume_with_the_flag_only(tmp_path, writer, resumer, restore):
    # resumed at step 2 (counter 1) for steps 3 and 4: 3 as in the uninterrupted run when the counter is
    # restored; without the flag it restarts from 0, and the restored best metric makes it 2
    _train(writer, tmp_path / "first")
    resumed = _train(resumer, tmp_path / "resumed", tmp_path / "first" / "checkpoint-2",
                     restore_callback_states_from_checkpoint=restore)
    assert _early_stopping(resumed).early_stopping_patience_counter == (3 if restore else 2)
    assert resumed.state.global_step == 4


class Counter(TrainerCallback, ExportableState):
    """optsched's own stateful callback: counts the steps it saw, from ``start``."""

    def __init__(self, start: int = 0):
        self.start = start
        self.steps = start

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def state(self) -> dict:
        return {"args": {"start": self.start}, "attributes": {"steps": self.steps}}


class Plain(TrainerCallback):
    pass


def test_callbacks_of_one_class_are_saved_as_a_list_and_restored_in_order_in_their_places():
    plain, first, second = Plain(), Counter(1), Counter(5)
    first.steps, second.steps = 3, 8
    control = TrainerControl(should_save=True)
    stored = export_states([plain, first, second], control, {"Gone": {"args": {}, "attributes": {}}})
    assert stored == {"Gone": {"args": {}, "attributes": {}},
                      "Counter": [{"args": {"start": 1}, "attributes": {"steps": 3}},
                                  {"args": {"start": 5}, "attributes": {"steps": 8}}],
                      "TrainerControl": {"args": {**dict.fromkeys(("should_training_stop", "should_epoch_stop",
                                                                    "should_evaluate", "should_log"), False),
                                                  "should_save": True}, "attributes": {}}}
    assert is_exportable(first) and is_exportable(control) and not is_exportable(plain)
    assert is_exportable(transformers.EarlyStoppingCallback()) and is_exportable(transformers.TrainerControl())

    fresh = [Counter(), plain, Counter(), Counter(7)]
    callbacks, new_control = restore_states(fresh, TrainerControl(), stored)
    assert callbacks[1] is plain and callbacks[3] is fresh[3]  # a third Counter has no state: kept as it is
    assert [(cb.start, cb.steps) for cb in (callbacks[0], callbacks[2])] == [(1, 3), (5, 8)]
    assert new_control == control
    assert Counter.from_state(stored["Counter"][1]).steps == 8


def test_a_state_the_class_cannot_take_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"stateful_callbacks\['Counter'\].*unexpected keyword"):
        restore_states([Counter()], TrainerControl(), {"Counter": {"args": {"begin": 1}, "attributes": {}}})
    with pytest.raises(TypeError, match=r"stateful_callbacks\['Counter'\] .* is 3"):
        restore_states([Counter()], TrainerControl(), {"Counter": 3})


def test_optsched_stateful_callback_resumes_with_its_count(tmp_path):
    fields = dict(FIELDS, eval_strategy="no", metric_for_best_model=None)
    counts = []
    for resume, restore in ((None, False), ("checkpoint-2", True), ("checkpoint-2", False)):
        trainer = make_trainer("optsched", PlainRegressor(), _data(), output_dir=str(tmp_path), **fields,
                               restore_callback_states_from_checkpoint=restore)
        trainer.add_callback(Counter())
        trainer.train(resume_from_checkpoint=resume and str(tmp_path / resume))
        (counter,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Counter)]
        counts.append(counter.steps)
    assert counts == [4, 4, 2]
