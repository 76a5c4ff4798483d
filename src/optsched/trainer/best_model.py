"""How ``train()`` ends with a tracked best checkpoint: ``load_best_model_at_end`` and ``save_total_limit=1``.

transformers 5.23's end of ``train()``, after the run's metrics are logged and before ``on_train_end``:

* with ``load_best_model_at_end`` and a ``state.best_model_checkpoint``, the best checkpoint's weights are
  loaded into the model (:meth:`BestModelMixin._load_best_model`, transformers' name), on every process;
* with ``save_total_limit=1`` and a best checkpoint, every other checkpoint of the run is deleted (during
  training the rotation kept the newest one beside the best, for a resume; the run is over), whether the
  best model is loaded or not (:func:`delete_all_but_best`).

Loading goes through optsched's checkpoint reading (:func:`~optsched.trainer.checkpoint.read_model_weights`):
``model.safetensors`` checked against ``checksums.json`` at ``checkpoint_verification``'s level, tied weights
filled through the tensor they share, a ``torch.compile``'d model loaded by its own names. A best checkpoint
that is gone (its directory, or a ``model.safetensors`` no ``checksums.json`` lists) is logged as a warning
and the model keeps the last step's weights, as transformers does; a damaged one (a checksum or size that
differs, a file ``checksums.json`` lists but that is missing, weights that do not match the model) raises
:class:`~optsched.trainer.checkpoint.CheckpointError` (``ValueError`` for the mismatch) naming the file:
the model keeps the last step's weights and no checkpoint is deleted, the newest one included, rather than
a run that ends as if its best model were loaded.

Differences from transformers, on purpose: a run stopped by a signal (``save_on_signal``) is not over,
so it neither loads the best model nor deletes its newest checkpoint, which the resume needs; the deletion
spares checkpoints numbered above the run's step (another run's, as the rotation does), and does nothing
when the best checkpoint is gone (transformers' ``os.path.samefile`` raises ``FileNotFoundError`` there).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from optsched.trainer import checkpoint as ckpt
from optsched.trainer.distributed import barrier
from optsched.trainer.update import _has_mode_switch

logger = logging.getLogger(__name__)

__all__ = ["BestModelMixin", "delete_all_but_best"]


def delete_all_but_best(output_dir: str | os.PathLike, best_model_checkpoint: str, up_to_step: int) -> list[Path]:
    """Delete the complete checkpoints of ``output_dir`` numbered up to ``up_to_step``, except the best one;
    return the deleted ones (none when the best checkpoint is not a directory).

    Checkpoints numbered above ``up_to_step`` belong to another run and are kept, as
    :func:`~optsched.trainer.checkpoint.rotate_checkpoints` keeps them.
    """
    best = Path(best_model_checkpoint)
    if not best.is_dir():
        return []
    best = best.resolve()
    doomed = [p for p in ckpt.list_checkpoints(output_dir)
              if ckpt.checkpoint_step(p) <= up_to_step and p.resolve() != best]
    for path in doomed:
        logger.info("Deleting older checkpoint %s (save_total_limit=1 keeps the best one, %s)", path, best)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class BestModelMixin:
    """The end of ``train()`` with a best checkpoint (:meth:`_end_with_best_model`) and transformers'
    ``_load_best_model``.

    Reads the Trainer's ``args``, ``state``, ``dist``, ``model``, ``optimizer`` and ``preempted_by``; calls
    its ``_finish_saves()`` and ``_checkpoint_verify()``.
    """

    def _end_with_best_model(self) -> None:
        """After the run's metrics are logged: load the best model (``load_best_model_at_end``), then, with
        ``save_total_limit=1``, delete every checkpoint but the best (process 0). Nothing for a run stopped by
        a signal (see the module docstring)."""
        args, state = self.args, self.state
        self._finish_saves()  # the last checkpoint flushed and older ones rotated before anything is read
        best = state.best_model_checkpoint
        if best is None or self.preempted_by is not None:
            return
        if args.load_best_model_at_end:
            self._load_best_model()
        if args.save_total_limit == 1 and self.dist.is_main_process:
            delete_all_but_best(args.output_dir, best, state.global_step)

    def _load_best_model(self) -> None:
        """Load ``state.best_model_checkpoint``'s weights into the model, in place (every process, after a
        barrier: process 0 wrote them). A schedule-free optimizer is left in ``eval()`` mode, where the
        model's weights are the averaged ones a checkpoint holds: ``evaluate()`` and ``save_model()`` then use
        the loaded weights as they are, and a later ``train()`` switches back.

        Raises:
            CheckpointError: the best checkpoint's ``model.safetensors`` is damaged, or missing while its
                ``checksums.json`` lists it; the model is left as it was.
            ValueError: its weights do not match the model.
        """
        best = Path(self.state.best_model_checkpoint)
        barrier(self.dist)
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        try:
            weights = ckpt.read_model_weights(self.model, best, self._checkpoint_verify())
        except FileNotFoundError:
            logger.warning(
                "Could not locate the best model at %s (load_best_model_at_end=True); the model keeps the last "
                "step's weights.", best / ckpt.WEIGHTS_NAME,
            )
            return
        except ValueError as exc:  # CheckpointError too
            raise type(exc)(
                f"load_best_model_at_end=True, but the best checkpoint cannot be loaded: {exc} The model keeps "
                "the last step's weights and no checkpoint was deleted."
            ) from None
        optimizer: Any = self.optimizer
        if _has_mode_switch(optimizer) and optimizer.param_groups[0].get("train_mode", True):
            optimizer.eval()  # before the copy: eval() moves the weights to their average
        ckpt.apply_model_weights(self.model, weights)
