"""Crash during a save (SIGKILL mid-checkpoint) and preemption (SIGTERM / SIGINT): nothing is lost.

Both compare the final weights of an interrupted-then-resumed run with an uninterrupted one, bitwise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import Tiny, make_args, make_data, weights
from _worker import RUN

from optsched.trainer import Trainer, TrainerCallback
from optsched.trainer import checkpoint as ckpt

WORKER = str(Path(__file__).with_name("_worker.py"))


def _reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    t = Trainer(Tiny(), make_args(str(tmp_path / "ref"), **RUN), train_dataset=make_data())
    t.train()
    return weights(t.model)


def _start(out: Path, mode: str, marker: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, str(out), mode, str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the marker")
        time.sleep(0.02)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_during_a_save_loses_nothing(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "in-save"
    proc = _start(out, "block-in-save", marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the half-written checkpoint-4 sits in its staging directory, never under a checkpoint-* name
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]

    resumed = Trainer(Tiny(seed=1), make_args(str(out), **RUN), train_dataset=make_data())
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-2, ignores the staging directory
    assert resumed.state.global_step == 8
    _assert_same(weights(resumed.model), _reference(tmp_path))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # the re-save replaced it


class _RaiseSignalAt(TrainerCallback):
    """Deliver ``sig`` to this process in the middle of step ``step`` (after its forward/backward)."""

    def __init__(self, sig: signal.Signals, step: int) -> None:
        self.sig, self.step = sig, step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_current_step_and_resume_is_exact(sig, tmp_path):
    out = tmp_path / "out"
    previous = signal.getsignal(sig)
    t = Trainer(Tiny(), make_args(str(out), **RUN), train_dataset=make_data(), callbacks=[_RaiseSignalAt(sig, 3)])
    result = t.train()  # returns normally
    assert result.global_step == 3 and t.preempted_by == sig.name
    assert signal.getsignal(sig) is previous  # handlers restored after train()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]

    resumed = Trainer(Tiny(seed=1), make_args(str(out), **RUN), train_dataset=make_data())
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8 and resumed.preempted_by is None
    _assert_same(weights(resumed.model), _reference(tmp_path))


def test_enable_jit_checkpoint_adds_sigterm_to_the_signals_saved_on(tmp_path):
    args = make_args(str(tmp_path / "out"), **RUN, save_signals="SIGINT", enable_jit_checkpoint=True)
    assert args.save_signals == "SIGINT,SIGTERM"
    t = Trainer(Tiny(), args, train_dataset=make_data(), callbacks=[_RaiseSignalAt(signal.SIGTERM, 3)])
    assert t.train().global_step == 3 and t.preempted_by == "SIGTERM"
    assert ckpt.list_checkpoints(tmp_path / "out")[-1].name == "checkpoint-3"
    with pytest.raises(ValueError, match="enable_jit_checkpoint=True saves a checkpoint on SIGTERM, which "
                                         "save_on_signal=False turns off; accepted: save_on_signal=True"):
        make_args(str(tmp_path / "o"), enable_jit_checkpoint=True, save_on_signal=False)


class _SigtermThenWait(_RaiseSignalAt):
    """SIGTERM in step ``step``, then past transformers' 3 s wait (``CheckpointManager.kill_wait``) before
    its checkpoint is requested."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(self.sig)
            time.sleep(3.3)


def test_transformers_arguments_with_enable_jit_checkpoint_save_the_step_transformers_saves(tmp_path):
    # transformers' Trainer and optsched's, both given transformers' TrainingArguments(enable_jit_checkpoint=True)
    # and a SIGTERM in step 3: both stop after step 3 with checkpoint-3 holding the same weights
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    fields = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=8, save_strategy="no",
                  use_cpu=True, optim="adamw_torch", seed=0, report_to="none", disable_tqdm=True,
                  enable_jit_checkpoint=True)
    saved = {}
    for kind in ("optsched", "transformers"):
        out = tmp_path / kind
        hf_args = transformers.TrainingArguments(output_dir=str(out), **fields)
        cls = Trainer if kind == "optsched" else transformers.Trainer
        trainer = cls(Tiny(), hf_args, train_dataset=make_data(), callbacks=[_SigtermThenWait(signal.SIGTERM, 3)])
        assert trainer.train().global_step == 3
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
        saved[kind] = load_file(out / "checkpoint-3" / "model.safetensors")
    _assert_same(saved["optsched"], saved["transformers"])


def test_save_on_signal_false_leaves_the_handlers_alone(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        t = Trainer(Tiny(), make_args(str(tmp_path / "o"), max_steps=4, save_on_signal=False, save_signals="SIGUSR1"),
                    train_dataset=make_data(), callbacks=[_RaiseSignalAt(signal.SIGUSR1, 2)])
        assert t.train().global_step == 4 and t.preempted_by is None
        assert seen == [signal.SIGUSR1] and not ckpt.list_checkpoints(tmp_path / "o")
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signal_exit_status_is_what_the_shell_reports_for_the_signal():
    from optsched.trainer.signals import signal_exit_status

    assert (signal_exit_status("SIGINT"), signal_exit_status("SIGTERM"), signal_exit_status("usr1")) == (
        130, 143, 128 + signal.SIGUSR1)
    with pytest.raises(ValueError, match="'SIGBOGUS' is not a signal"):
        signal_exit_status("SIGBOGUS")


def test_handlers_are_not_installed_outside_the_main_thread(tmp_path):
    import threading

    from optsched.trainer.signals import PreemptionHandler

    result = {}

    def run():
        with PreemptionHandler("SIGTERM") as h:
            result["installed"] = h.installed

    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert result == {"installed": False}


def test_handlers_are_restored_when_training_fails(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    t = Trainer(Tiny(), make_args(str(tmp_path / "o"), max_steps=4), train_dataset=make_data(), callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_real_sigterm_from_outside_exits_cleanly_with_a_checkpoint(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "at-step-3"
    proc = _start(out, "wait-for-signal", marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "done step=3 preempted_by=SIGTERM" in stdout
    assert ckpt.get_last_checkpoint(out).name == "checkpoint-3"
