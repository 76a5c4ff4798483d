"""The Trainer's saving and resuming: checkpoints at a step, the model, and what a resume restores.

:class:`CheckpointMixin` holds these methods of :class:`~optsched.trainer.trainer.Trainer`; the file
formats and atomic writes are :mod:`optsched.trainer.checkpoint`'s (which re-exports the checksums of
:mod:`optsched.trainer.integrity` and the optimizer file of :mod:`optsched.trainer.optimizer_state`),
the resume plan :mod:`optsched.trainer.resume`'s.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from optsched.trainer import checkpoint as ckpt
from optsched.trainer.callback_state import export_states, restore_states
from optsched.trainer.data import TrainingPlan
from optsched.trainer.distributed import all_reduce_sum
from optsched.trainer.log_levels import logs_at_process_level
from optsched.trainer.nonfinite import check_finite_weights
from optsched.trainer.resume import prepare_resume, restore_scheduler, save_plan
from optsched.trainer.state import TrainerState

logger = logging.getLogger(__name__)

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """``save_model()``, ``_save_checkpoint()`` (a signal's too) and the steps of a resume.

    Reads the Trainer's ``args``, ``dist``, ``device``, ``model``, ``optimizer``, ``lr_scheduler``,
    ``scaler``, ``state``, ``control`` and ``callback_handler``, and ``_preemption`` when ``train()``
    set it; calls its ``_optimizer_eval_mode()``. Sets ``_last_saved_step``, ``preempted_by``, ``control`` and
    the callbacks' list (a resume with ``restore_callback_states_from_checkpoint``),
    ``_save_finisher`` (the thread that flushes the last checkpoint and rotates older ones) and
    ``_warned_checkpoints_above`` (the output dirs already warned of another run's newer checkpoints).
    """

    @logs_at_process_level
    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """Write ``model.safetensors`` (and a transformers model's ``config.json``, and
        ``generation_config.json`` where it generates) on process 0.

        Schedule-free optimizers are switched to ``eval()`` so the averaged weights are saved.
        """
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.dist.is_main_process:
            with self._optimizer_eval_mode():
                check_finite_weights(self.model, f"{out / ckpt.WEIGHTS_NAME}")
                ckpt.save_model_weights(self.model, out)

    def _save_checkpoint(self) -> Path:
        # the previous save's flush and rotation end before this one publishes anything: a rotation that
        # saw this checkpoint could otherwise count it, unflushed, among the ones to keep
        self._finish_saves()
        self.store_flos()  # every process (a collective under DDP): trainer_state.json carries total_flos
        args, state = self.args, self.state
        run_dir = Path(args.output_dir)
        final = run_dir / f"{ckpt.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        main = self.dist.is_main_process
        if state.best_global_step is not None:
            best = run_dir / f"{ckpt.PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
            if best == final or best.is_dir():
                state.best_model_checkpoint = str(best)
        # a checkpoint-N this run already wrote (the same step saved again) is replaced whatever became of
        # it; another run's is replaced only when intact, else renamed aside (staged_checkpoint)
        own = getattr(self, "_last_saved_step", None) == state.global_step
        # one switch to a schedule-free optimizer's averaged weights for the check and the files: each
        # eval() / train() pair is two passes over the weights and moves the training point by rounding
        with self._optimizer_eval_mode():
            # never publish NaN / inf weights: raise before anything is written (every process checks)
            check_finite_weights(self.model, f"checkpoint {final}")
            with ckpt.staged_checkpoint(final, self.dist, own=own) as tmp:
                # the weights' CRC runs on a worker thread while optimizer.pt is written (its own CRC is
                # computed as torch writes it): neither is a pass of its own in write_checksums
                if main:
                    ckpt.checksum_in_background(ckpt.save_model_weights(self.model, tmp))
                    save_plan(tmp, self.optimizer, self.lr_scheduler)  # optsched_plan.json: lr_resume_policy compares it
                if main and not args.save_only_model:
                    # projector objects (GaLore / APOLLO) as class path + attributes: weights_only loads them
                    ckpt.save_optimizer_state(self.optimizer, tmp)
                if not args.save_only_model:
                    if main:
                        torch.save(self.lr_scheduler.state_dict(), tmp / ckpt.SCHEDULER_NAME)
                        if self.scaler is not None:
                            torch.save(self.scaler.state_dict(), tmp / ckpt.SCALER_NAME)
                    ckpt.save_rng_state(tmp, self.dist)
                if main:
                    # every stateful callback's state, transformers' layout (either Trainer resumes it)
                    state.stateful_callbacks = export_states(self.callback_handler.callbacks, self.control,
                                                             state.stateful_callbacks)
                    state.save_to_json(tmp / ckpt.TRAINER_STATE_NAME)
                    (tmp / ckpt.TRAINING_ARGS_NAME).write_text(self._args_json(), encoding="utf-8")
        if main:
            self._warn_of_checkpoints_above(run_dir, state.global_step)
            # flushed to disk on a worker thread, and only then are older checkpoints deleted: the
            # training goes on meanwhile, and a crash never leaves the run without a whole checkpoint
            self._finish_save_in_background(final, run_dir, args.save_total_limit, state.best_model_checkpoint)
        self._last_saved_step = state.global_step
        return final

    def _warn_of_checkpoints_above(self, run_dir: Path, step: int) -> None:
        """Warn, once per Trainer and ``output_dir``, when ``run_dir`` holds checkpoints numbered above the
        step just saved: they are from another run, ``save_total_limit`` keeps them, and
        ``resume_from_checkpoint=True`` would take the highest of them instead of this run's newest."""
        above = ckpt.checkpoints_above(run_dir, step)
        warned = getattr(self, "_warned_checkpoints_above", set())
        if not above or str(run_dir) in warned:
            return
        self._warned_checkpoints_above = warned | {str(run_dir)}
        logger.warning(
            "%s holds checkpoints numbered above the step just saved (%d), from another run: %s. "
            "save_total_limit never deletes them, and resume_from_checkpoint=True would resume from the "
            "highest-numbered one, %s, not from this run's newest; pass this run's checkpoint path "
            "explicitly, or move them out of the way.",
            run_dir, step, ", ".join(p.name for p in above), above[-1],
        )

    def _finish_save_in_background(
        self, final: Path, run_dir: Path, save_total_limit: int | None, best: str | None
    ) -> None:
        """Start :func:`_flush_then_rotate` for the checkpoint just written (the previous one's has ended)."""
        self._save_finisher = threading.Thread(
            target=_flush_then_rotate, args=(final, run_dir, save_total_limit, best),
            name="optsched-checkpoint-flush", daemon=True,
        )
        self._save_finisher.start()

    def _finish_saves(self) -> None:
        """Wait until the last checkpoint is on disk and older ones are rotated (``train()`` ends with it)."""
        finisher = getattr(self, "_save_finisher", None)
        if finisher is not None:
            finisher.join()
            self._save_finisher = None

    def _args_json(self) -> str:
        to_json = getattr(self.args, "to_json_string", None)
        if callable(to_json):
            return to_json()
        return json.dumps(vars(self.args), indent=2, default=str)

    def _maybe_save_on_signal(self) -> None:
        """After a step: if a preemption signal arrived (on any process), save at this step and stop."""
        handler = getattr(self, "_preemption", None)
        if handler is None or not handler.enabled:
            return
        requested = handler.requested
        if self.dist.enabled:  # every process must agree, or the checkpoint's barriers would hang
            flag = torch.tensor(1.0 if requested else 0.0, device=self.device)
            requested = bool(all_reduce_sum(flag, self.dist).item() > 0)
        if not requested:
            return
        self.preempted_by = handler.signal_name or "a signal on another process"
        step = self.state.global_step
        saved = Path(self.args.output_dir) / f"{ckpt.PREFIX_CHECKPOINT_DIR}-{step}"
        if getattr(self, "_last_saved_step", None) != step or not ckpt.is_complete_checkpoint(saved):
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        logger.warning(
            "Stopped by %s at step %d; checkpoint saved in %s. Resume with train(resume_from_checkpoint=True).",
            self.preempted_by, step, saved,
        )
        self.control.should_training_stop = True

    # ---- resuming ------------------------------------------------------------------------------------

    def _resolve_checkpoint(self, resume_from_checkpoint: Any) -> Path | None:
        """The checkpoint ``train(resume_from_checkpoint=...)`` resumes from, or ``None``; before anything
        is read from it, every file its ``checksums.json`` lists is there
        (:func:`~optsched.trainer.checkpoint.check_checkpoint_files`), so a lost file changes nothing."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            found = ckpt.get_last_checkpoint(self.args.output_dir)
            self._check_passed_over(found)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but no complete checkpoint (checkpoint-N with "
                    f"{ckpt.TRAINER_STATE_NAME} and {ckpt.WEIGHTS_NAME}) is in output_dir={self.args.output_dir!r}."
                )
            try:
                ckpt.check_checkpoint_files(found)
            except ckpt.CheckpointError as exc:
                raise self._with_previous_checkpoint_hint(exc, found) from None
            return found
        if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
            raise TypeError(
                f"resume_from_checkpoint must be a path, True or None, got {type(resume_from_checkpoint).__name__}."
            )
        path = Path(resume_from_checkpoint)
        missing = ckpt.missing_required_files(path)
        if not path.is_dir() or missing:
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint "
                f"({'no such directory' if not path.is_dir() else 'missing ' + ', '.join(missing)}); accepted: "
                "a checkpoint-N directory written by the Trainer, or True for the newest one in output_dir."
            )
        ckpt.check_checkpoint_files(path)
        return path

    def _check_passed_over(self, found: Path | None) -> None:
        """Newer ``checkpoint-N`` directories that ``resume_from_checkpoint=True`` passes over because they
        lack ``trainer_state.json`` or ``model.safetensors``: one whose ``checksums.json`` lists the missing
        file lost it (a ``CheckpointError`` naming it, and the complete checkpoint to pass explicitly); any
        other is skipped with a warning, never silently."""
        above = -1 if found is None else ckpt.checkpoint_step(found)
        for path in reversed(ckpt.incomplete_checkpoints(self.args.output_dir, above)):  # newest first
            try:
                ckpt.check_checkpoint_files(path)
            except ckpt.CheckpointError as exc:
                hint = (f" To resume from the newest complete checkpoint, pass resume_from_checkpoint={str(found)!r}."
                        if found is not None else "")
                raise ckpt.CheckpointError(f"{exc}{hint}") from None
            logger.warning(
                "%s is passed over: it is not a complete checkpoint (no %s)%s.",
                path, " or ".join(ckpt.missing_required_files(path)), f"; resuming from {found.name}" if found is not None else "",
            )

    def _with_previous_checkpoint_hint(self, error: ckpt.CheckpointError, checkpoint: Path) -> ckpt.CheckpointError:
        """``error`` (from the newest checkpoint, which ``resume_from_checkpoint=True`` took) with the way
        to resume from the complete checkpoint before it, when there is one. Nothing is picked silently:
        a damaged newest checkpoint may mean a damaged disk."""
        found = ckpt.list_checkpoints(self.args.output_dir)  # oldest first
        names = [p.name for p in found]
        if checkpoint.name not in names or names.index(checkpoint.name) == 0:
            return error
        previous = found[names.index(checkpoint.name) - 1]
        return ckpt.CheckpointError(
            f"{error} resume_from_checkpoint=True took the newest checkpoint, {checkpoint.name}; to resume from "
            f"the one before it, pass resume_from_checkpoint={str(previous)!r} (its files are checked as it loads)."
        )

    def _initial_state(self, plan: TrainingPlan, checkpoint: Path | None) -> TrainerState:
        if checkpoint is not None:
            # a damaged file raises CheckpointError naming it
            state = ckpt.load_trainer_state(checkpoint, verify=self._checkpoint_verify())
            if state.best_model_checkpoint and not Path(state.best_model_checkpoint).is_dir():
                logger.warning(
                    "The best checkpoint %s recorded in the resumed state does not exist anymore. Ignoring it for "
                    "this run.", state.best_model_checkpoint,
                )
                state.best_model_checkpoint = None
            self._warn_of_another_batch(checkpoint, state.train_batch_size)
            if self.args.restore_callback_states_from_checkpoint:
                self._restore_callback_states(state.stateful_callbacks)
        else:
            state = TrainerState()
            state.stateful_callbacks = export_states(self.callback_handler.callbacks, self.control)
        state.compute_steps(self.args, plan.max_steps)
        state.max_steps = plan.max_steps
        state.num_train_epochs = plan.num_train_epochs
        state.train_batch_size = self._train_batch_size
        state.is_local_process_zero = self.dist.local_rank == 0
        state.is_world_process_zero = self.dist.is_main_process
        return state

    def _restore_callback_states(self, stored: dict[str, Any]) -> None:
        """``restore_callback_states_from_checkpoint``: the callbacks and the control of a class the checkpoint
        saved are rebuilt from their states (:func:`~optsched.trainer.callback_state.restore_states`), in their
        places in ``callback_handler.callbacks``; ``self.control`` too."""
        handler = self.callback_handler
        handler.callbacks[:], self.control = restore_states(handler.callbacks, self.control, stored)

    def _warn_of_another_batch(self, checkpoint: Path, saved_batch_size: Any) -> None:
        """Warn (process 0) when ``checkpoint`` was trained with another batch per step than resumes it:
        another number of processes (:func:`~optsched.trainer.checkpoint.saved_process_count`), another
        ``per_device_train_batch_size`` (``trainer_state.json``) or ``gradient_accumulation_steps``
        (optsched's ``training_args.json``). Such a resume is not exact: the epoch and the position in the
        data are recomputed for the new batch (samples are seen again or skipped), and with other processes
        the RNG states differ too. Without a word, 4 processes resumed by 2 (each finding its RNG file), or
        a halved batch (which trains epochs again), looked like an exact resume."""
        if not self.dist.is_main_process:
            return
        saved = {
            "per_device_train_batch_size": saved_batch_size,
            "gradient_accumulation_steps": ckpt.saved_training_argument(checkpoint, "gradient_accumulation_steps"),
            "processes": ckpt.saved_process_count(checkpoint),
        }
        now = {
            "per_device_train_batch_size": self._train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "processes": self.dist.world_size,
        }
        changed = [k for k in saved if saved[k] is not None and saved[k] != now[k]]
        if not changed:
            return
        rng = ""
        if "processes" in changed:
            rng = " The RNG states are per process: dropout masks differ from the uninterrupted run's."
        logger.warning(
            "%s was trained with %s and is resumed with %s: the resume is not exact. The epoch and the "
            "position in the data are recomputed for the new batch per step (per_device_train_batch_size x "
            "gradient_accumulation_steps x processes), so samples are seen again or skipped.%s Resume with "
            "the checkpoint's values for an exact continuation.",
            checkpoint, ", ".join(f"{k}={saved[k]}" for k in changed), ", ".join(f"{k}={now[k]}" for k in changed), rng,
        )

    def _checkpoint_verify(self) -> str:
        """How much a resume checks the checkpoint's files against ``checksums.json``
        (:data:`optsched.trainer.integrity.VERIFY_LEVELS`; ``args.checkpoint_verification``, default "full")."""
        return self.args.checkpoint_verification  # validated by TrainingArguments

    def _load_optimizer_and_scheduler(self, checkpoint: Path, saved_optimizer: dict[str, Any] | None = None) -> None:
        """Restore optimizer, scheduler and scaler; ``saved_optimizer``: ``optimizer.pt`` already read
        (:func:`~optsched.trainer.checkpoint.load_weights_and_read_optimizer`), else it is read here."""
        verify = self._checkpoint_verify()
        has_optimizer = ckpt.file_present(checkpoint / ckpt.OPTIMIZER_NAME)
        # the checkpoint's plan vs the new one, before the optimizer state overwrites the new settings
        resume = prepare_resume(
            self.optimizer, self.lr_scheduler, checkpoint, self.args.lr_resume_policy, verify=verify,
            loads_optimizer_state=has_optimizer,
        )
        # a file checksums.json lists but that is gone raises (file_present) instead of being taken for
        # one never written (save_only_model, a transformers checkpoint): the Trainer checked them all
        # before it loaded anything (_resolve_checkpoint); this is for a direct call
        sched_file, scaler_file = checkpoint / ckpt.SCHEDULER_NAME, checkpoint / ckpt.SCALER_NAME
        has_sched, has_scaler = ckpt.file_present(sched_file), ckpt.file_present(scaler_file)
        if has_optimizer:
            ckpt.load_optimizer_state(self.optimizer, checkpoint, verify=verify, saved=saved_optimizer)
        else:
            logger.warning("%s has no %s (save_only_model=True?): the optimizer state starts fresh.", checkpoint, ckpt.OPTIMIZER_NAME)
        saved_sched = ckpt.safe_torch_load(sched_file, verify=verify) if has_sched else None
        restore_scheduler(self.lr_scheduler, self.optimizer, saved_sched, self.state.global_step, resume)
        if self.scaler is not None and has_scaler:
            self.scaler.load_state_dict(ckpt.safe_torch_load(scaler_file, verify=verify))


def _flush_then_rotate(final: Path, run_dir: Path, save_total_limit: int | None, best: str | None) -> None:
    """:func:`~optsched.trainer.checkpoint.make_durable` on ``final``, then delete the checkpoints beyond
    ``save_total_limit`` (older than ``final``: never it, nor another run's numbered above it); if the
    flush fails, nothing is deleted (the error is logged: the checkpoints already on disk are the ones a
    resume will need)."""
    try:
        ckpt.make_durable(final)
    except OSError as exc:
        logger.error(
            "%s could not be flushed to disk (%s); older checkpoints are kept (save_total_limit not applied).",
            final, exc,
        )
        return
    ckpt.rotate_checkpoints(run_dir, save_total_limit, best, current=final)
