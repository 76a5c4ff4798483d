"""load_best_model_at_end and the end of train() with a best checkpoint (optsched.trainer.best_model)."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optsched import Trainer, TrainerCallback, TrainingArguments
from optsched.trainer.checkpoint import CheckpointError
from trainer_helpers import make_trainer, masked_lm_data, tiny_bert, tiny_llama

transformers = pytest.importorskip("transformers")

#: A metric for compute_metrics, one value per evaluation: lowest at the 3rd (step 6), highest at the 4th
#: (step 8), neither at the last
SCORES = (0.4, 0.2, 0.1, 0.7, 0.5, 0.3)


def _scripted_metric():
    values = iter(SCORES)
    return lambda eval_pred: {"score": next(values)}


def _classification_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
            for _ in range(n)]


def _fields(out: Path, **overrides):
    """12 steps of 4 samples from 13 (a short last batch each epoch), evaluated and saved every 2: at this
    learning rate the eval loss falls to step 4 (0.598) and then rises (0.614, 0.598, 0.635, ... 0.653)."""
    return dict(dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=0.03,
                     eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, logging_steps=2,
                     disable_tqdm=True, use_cpu=True, seed=0, load_best_model_at_end=True), **overrides)


def _train(kind: str, out: Path, make_model=tiny_bert, scripted: bool = False, callbacks=None, **overrides):
    torch.manual_seed(0)
    model = make_model()
    trainer = make_trainer(kind, model, _classification_data(13, 0), None, _classification_data(7, 1),
                           compute_metrics=_scripted_metric() if scripted else None, callbacks=callbacks,
                           **_fields(out, **overrides))
    trainer.train()
    return trainer


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir() if p.name.startswith("checkpoint-"))


def _equals_file(model: torch.nn.Module, checkpoint: Path) -> bool:
    """Whether every tensor of ``checkpoint``'s model.safetensors equals the model's, bitwise."""
    state = model.state_dict()
    return all(torch.equal(state[name], tensor) for name, tensor in load_file(str(checkpoint / "model.safetensors")).items())


@pytest.mark.parametrize(("overrides", "best_step", "kept"), [
    pytest.param(dict(save_total_limit=2), 4, [4, 12], id="eval_loss-limit-2"),
    pytest.param(dict(), 4, [2, 4, 6, 8, 10, 12], id="eval_loss-no-limit"),
    pytest.param(dict(metric_for_best_model="score", greater_is_better=False, save_total_limit=1), 6, [6],
                 id="lower-is-better-limit-1"),
    pytest.param(dict(metric_for_best_model="score", save_total_limit=2), 8, [8, 12], id="higher-is-better-limit-2"),
    pytest.param(dict(metric_for_best_model="score", save_total_limit=1, save_only_model=True), 8, [8],
                 id="save-only-model-limit-1"),
    pytest.param(dict(metric_for_best_model="score", save_strategy="best"), 8, [2, 8], id="save-strategy-best"),
    pytest.param(dict(metric_for_best_model="score", eval_strategy="epoch", save_strategy="epoch", save_total_limit=1),
                 4, [4], id="epochs-limit-1"),
])
def test_the_best_checkpoint_is_loaded_as_transformers_trainer_loads_it(tmp_path, overrides, best_step, kept):
    scripted = overrides.get("metric_for_best_model") == "score"
    ours = _train("optsched", tmp_path / "optsched", scripted=scripted, **overrides)
    hf = _train("hf", tmp_path / "hf", scripted=scripted, **overrides)
    assert ours.state.best_global_step == hf.state.best_global_step == best_step != ours.state.global_step
    assert _checkpoints(tmp_path / "optsched") == _checkpoints(tmp_path / "hf") == kept
    best = Path(ours.state.best_model_checkpoint)
    assert best == tmp_path / "optsched" / f"checkpoint-{best_step}"
    assert Path(hf.state.best_model_checkpoint) == tmp_path / "hf" / best.name
    # eval_loss: the two Trainers' losses differ in the 7th digit (their per-batch sums)
    assert ours.state.best_metric == pytest.approx(hf.state.best_metric, rel=1e-6)
    assert _equals_file(ours.model, best)
    hf_state = hf.model.state_dict()
    assert all(torch.equal(tensor, hf_state[name]) for name, tensor in ours.model.state_dict().items())
    # the run's metrics are logged last (before the best model is loaded), the same keys and train_loss
    assert ours.state.log_history[-1].keys() == hf.state.log_history[-1].keys()
    assert ours.state.log_history[-1]["train_loss"] == pytest.approx(hf.state.log_history[-1]["train_loss"], rel=1e-6)


def test_without_load_best_model_at_end_the_model_keeps_the_last_weights(tmp_path):
    # the control of the test above: the best checkpoint's weights are not the last ones
    trainer = _train("optsched", tmp_path, load_best_model_at_end=False, metric_for_best_model="loss", save_total_limit=2)
    assert trainer.state.best_global_step == 4 and _checkpoints(tmp_path) == [4, 12]
    assert _equals_file(trainer.model, tmp_path / "checkpoint-12")
    assert not _equals_file(trainer.model, tmp_path / "checkpoint-4")


@pytest.mark.parametrize("optim", ["adamw_torch", "schedule_free_adamw"])
def test_evaluate_after_training_gives_the_best_metric(tmp_path, optim):
    # a schedule-free optimizer is left in eval() mode, its weights the averaged ones the checkpoint holds:
    # evaluate() and save_model() take them as they are
    if optim.startswith("schedule_free"):
        pytest.importorskip("schedulefree")
    trainer = _train("optsched", tmp_path / "run", optim=optim)
    best = Path(trainer.state.best_model_checkpoint)
    assert trainer.state.best_global_step != trainer.state.global_step and _equals_file(trainer.model, best)
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric
    trainer.save_model(tmp_path / "final")
    assert load_file(str(tmp_path / "final" / "model.safetensors")).keys() == load_file(str(best / "model.safetensors")).keys()
    assert _equals_file(trainer.model, tmp_path / "final") and _equals_file(trainer.model, best)


def _causal_lm_trainer(out: Path, **overrides):
    torch.manual_seed(0)
    model = tiny_llama()  # tied: lm_head.weight is model.embed_tokens.weight, saved once
    fields = _fields(out, metric_for_best_model="score", per_device_train_batch_size=2, **overrides)
    return Trainer(model, TrainingArguments(**fields), train_dataset=masked_lm_data(12), eval_dataset=masked_lm_data(4),
                   compute_metrics=_scripted_metric())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch_compile"])
def test_tied_weights_stay_tied_and_a_compiled_model_loads(tmp_path, compiled):
    trainer = _causal_lm_trainer(tmp_path, **(dict(torch_compile_backend="eager") if compiled else {}))
    trainer.train()
    model = trainer.model
    assert trainer.state.best_global_step == 8 and _equals_file(model, tmp_path / "checkpoint-8")
    assert "lm_head.weight" not in load_file(str(tmp_path / "checkpoint-8" / "model.safetensors"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


class _AtLastSave(TrainerCallback):
    """Runs ``action(best checkpoint)`` once the last checkpoint is saved (before train() ends)."""

    def __init__(self, action) -> None:
        self.action = action

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self.action(Path(state.best_model_checkpoint))


def _flip_a_weight_byte(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the same size: only the checksum catches it
    path.write_bytes(bytes(data))


def test_a_damaged_best_checkpoint_raises_and_keeps_the_last_weights_and_checkpoints(tmp_path):
    trainer = Trainer(*_bert_and_args(tmp_path, save_total_limit=1), train_dataset=_classification_data(13, 0),
                      eval_dataset=_classification_data(7, 1), callbacks=[_AtLastSave(_flip_a_weight_byte)])
    with pytest.raises(CheckpointError, match=r"load_best_model_at_end=True, but the best checkpoint cannot be "
                                              r"loaded: .*checkpoint-4.model\.safetensors"):
        trainer.train()
    assert _checkpoints(tmp_path) == [4, 12]  # save_total_limit=1 deleted nothing: the newest is there
    assert _equals_file(trainer.model, tmp_path / "checkpoint-12")


def test_a_best_checkpoint_that_is_gone_is_a_warning_and_the_last_weights_stay(tmp_path, caplog):
    trainer = Trainer(*_bert_and_args(tmp_path, save_total_limit=1), train_dataset=_classification_data(13, 0),
                      eval_dataset=_classification_data(7, 1), callbacks=[_AtLastSave(shutil.rmtree)])
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.best_model"):
        trainer.train()
    assert "Could not locate the best model at " in caplog.text and "checkpoint-4" in caplog.text
    # save_total_limit=1 deleted nothing (the rotation may or may not have kept checkpoint-10 beside the best
    # that was there when it ran)
    assert 12 in _checkpoints(tmp_path) and _equals_file(trainer.model, tmp_path / "checkpoint-12")


def _bert_and_args(out: Path, **overrides):
    torch.manual_seed(0)
    return tiny_bert(), TrainingArguments(**_fields(out, **overrides))


class _SignalAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_a_run_stopped_by_a_signal_neither_loads_the_best_nor_deletes_the_newest(tmp_path):
    # the run is not over: its resume needs the newest checkpoint, and the model is that checkpoint's
    trainer = Trainer(*_bert_and_args(tmp_path, save_total_limit=1), train_dataset=_classification_data(13, 0),
                      eval_dataset=_classification_data(7, 1), callbacks=[_SignalAt(8)])
    trainer.train()
    assert trainer.preempted_by == "SIGTERM" and trainer.state.best_global_step == 4
    assert _checkpoints(tmp_path) == [4, 8] and _equals_file(trainer.model, tmp_path / "checkpoint-8")


@pytest.mark.parametrize("resume_step", [2, 6], ids=["best-after-resume", "best-before-resume"])
def test_a_resumed_run_keeps_tracking_the_best_and_loads_it(tmp_path, resume_step):
    straight = _train("optsched", tmp_path)
    assert straight.state.best_global_step == 4
    weights = {name: tensor.clone() for name, tensor in straight.model.state_dict().items()}
    resumed = Trainer(*_bert_and_args(tmp_path), train_dataset=_classification_data(13, 0),
                      eval_dataset=_classification_data(7, 1))
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{resume_step}"))
    assert resumed.state.best_model_checkpoint == straight.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    assert resumed.state.best_metric == straight.state.best_metric
    assert all(torch.equal(tensor, weights[name]) for name, tensor in resumed.model.state_dict().items())
    assert _equals_file(resumed.model, tmp_path / "checkpoint-4")


def test_a_resume_whose_best_checkpoint_is_gone_warns_and_ends_with_the_last_weights(tmp_path, caplog):
    _train("optsched", tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-4")
    resumed = Trainer(*_bert_and_args(tmp_path), train_dataset=_classification_data(13, 0),
                      eval_dataset=_classification_data(7, 1))
    with caplog.at_level(logging.WARNING, logger="optsched.trainer.checkpointing"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert f"The best checkpoint {tmp_path / 'checkpoint-4'} recorded in the resumed state does not exist" in caplog.text
    # no later evaluation beats step 4's, so no checkpoint is the best: the last weights stay (transformers too)
    assert resumed.state.best_model_checkpoint is None and resumed.state.best_global_step == 4
    assert _equals_file(resumed.model, tmp_path / "checkpoint-12")


def test_transformers_early_stopping_callback_with_the_best_model_loaded(tmp_path, caplog):
    # EarlyStoppingCallback reads load_best_model_at_end (it warns when False), metric_for_best_model,
    # greater_is_better and state.best_metric: eval_loss is worse at steps 6 and 8, so patience 2 stops at 8
    runs = {}
    for kind in ("optsched", "hf"):
        with caplog.at_level(logging.WARNING):
            runs[kind] = _train(kind, tmp_path / kind, callbacks=[transformers.EarlyStoppingCallback(2)])
    ours, hf = runs["optsched"], runs["hf"]
    assert "without load_best_model_at_end=True" not in caplog.text
    assert ours.state.global_step == hf.state.global_step == 8 and ours.state.best_global_step == 4
    assert _checkpoints(tmp_path / "optsched") == _checkpoints(tmp_path / "hf") == [2, 4, 6, 8]
    assert _equals_file(ours.model, tmp_path / "optsched" / "checkpoint-4")
    hf_state = hf.model.state_dict()
    assert all(torch.equal(tensor, hf_state[name]) for name, tensor in ours.model.state_dict().items())
