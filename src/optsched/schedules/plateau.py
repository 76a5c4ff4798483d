"""``reduce_lr_on_plateau``: torch's ``ReduceLROnPlateau`` carrying optsched's schedule spec.

It *is* a ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (HF's Trainer, Lightning and accelerate all
recognise it and step it with the eval metric); the only addition is :attr:`PlateauLR.spec`, kept in
``state_dict()`` so a resume can tell which schedule produced a checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["PlateauLR"]


class PlateauLR(ReduceLROnPlateau):
    """``ReduceLROnPlateau`` with a :attr:`spec`; step it with the metric: ``scheduler.step(eval_loss)``.

    After ``patience`` evaluations without an improvement larger than ``threshold`` the lr of every
    group is multiplied by ``factor`` (never below ``min_lr``), then ``cooldown`` evaluations are
    ignored. All arguments are torch's.
    """

    def __init__(self, optimizer: Optimizer, *, spec: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.spec: dict[str, Any] = copy.deepcopy(dict(spec)) if spec is not None else {
            "name": "reduce_lr_on_plateau",
            "num_warmup_steps": None,
            "num_training_steps": None,
            "kwargs": dict(kwargs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; the current :attr:`spec` (how this run was configured) is kept."""
        state = {k: v for k, v in state_dict.items() if k != "spec"}
        super().load_state_dict(state)
