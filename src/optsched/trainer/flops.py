"""``total_flos``: transformers' estimate of the floating-point operations a run put into its model.

transformers' Trainer adds, after each micro-batch, ``6 x tokens x parameters`` (forward and backward
of every non-embedding parameter for every token of the model's main input, ``main_input_name``,
``input_ids`` by default) for a model with ``num_parameters`` (a transformers model); 0 for any other
model. The per-process count is added to ``state.total_flos`` (summed over processes) at every
checkpoint and at the end of training, so ``trainer_state.json`` and the ``total_flos`` train metric
carry it. :class:`FlopsMixin` does the same with one difference in cost, not in value:
transformers counts the non-embedding parameters again for every micro-batch (a walk of every module
and parameter, with a list search per parameter); here they are counted once per ``train()``.
Override :meth:`FlopsMixin.floating_point_ops` for another estimate, as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optsched.trainer.distributed import all_reduce_sum, unwrap_model
from optsched.trainer.loss_items import main_input_name

__all__ = ["FlopsMixin"]


class FlopsMixin:
    """``floating_point_ops`` / ``store_flos`` of transformers' Trainer (see the module docstring).

    Expects ``self.model``, ``self.state``, ``self.dist`` and ``self.device`` from the Trainer.
    """

    current_flos: float = 0.0  # this process's operations since the last store_flos()
    _flos_parameters: int | None = None  # non-embedding parameters, counted once per train()

    def floating_point_ops(self, inputs: Any) -> int:
        """``6 x inputs[main_input_name].numel() x non-embedding parameters`` for a transformers model
        (anything with ``num_parameters``) fed a dict batch with its main input; 0 otherwise."""
        model = unwrap_model(self.model)
        main_input = main_input_name(model)
        if not isinstance(inputs, Mapping) or main_input not in inputs or not hasattr(model, "num_parameters"):
            return 0
        tokens = inputs[main_input]
        if not isinstance(tokens, torch.Tensor):
            return 0
        if self._flos_parameters is None:
            self._flos_parameters = int(model.num_parameters(exclude_embeddings=True))
        return 6 * tokens.numel() * self._flos_parameters

    def store_flos(self) -> None:
        """Add this process's count (summed over every process under DDP) to ``state.total_flos``.

        A collective under DDP: every process calls it at the same points (each checkpoint, the end of
        training)."""
        flos = self.current_flos
        if self.dist.enabled:
            flos = all_reduce_sum(torch.tensor(flos, dtype=torch.float64, device=self.device), self.dist).item()
        self.state.total_flos += flos
        self.current_flos = 0.0

    def _reset_flos_count(self) -> None:
        """At the start of ``train()``: the model's parameters are counted again on first use."""
        self._flos_parameters = None
        self.current_flos = 0.0
