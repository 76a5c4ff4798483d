"""Non-finite losses and gradients: skip the step, count it, stop after too many in a row.

Policy (the Trainer applies it at every optimizer step):

* a step is *non-finite* when its loss (summed over the step's micro-batches, and over processes under
  DDP) or its total gradient norm ``sqrt(sum ||g||^2)`` is NaN or infinite;
* such a step is skipped: no ``optimizer.step()`` **and no** ``lr_scheduler.step()``, as torch AMP's
  ``GradScaler`` and transformers / accelerate do for an fp16 overflow, so the learning rate stays
  aligned with the number of updates actually applied. The gradients are dropped, ``global_step``
  still advances (the batches were consumed, so the data position of a resume stays exact);
* each skip is counted (``skipped_total``, ``consecutive``) and logged as a warning; the logged
  training loss leaves the step out;
* up to ``max_consecutive`` steps in a row are skipped; the next non-finite one stops training with
  :class:`NonFiniteError` (``max_consecutive=0``: the first one does). A finite step resets the run.

Independently, :func:`check_finite_weights` runs before every save, so no checkpoint with NaN or inf
weights is ever written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "NonFiniteGuard", "check_finite_weights", "grad_total_norm"]


class NonFiniteError(FloatingPointError):
    """Training met NaN / inf values it cannot step over (too many skips, or weights about to be saved)."""


def grad_total_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, ``sqrt(sum_p ||g_p||^2)``, as a 0-dim float32 tensor.

    NaN when any gradient holds a NaN, inf when one holds an inf (and none a NaN); 0 with no gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g.detach(), 2.0, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def check_finite_weights(model: nn.Module, where: str = "the checkpoint") -> None:
    """Raise :class:`NonFiniteError` naming the parameters and buffers that hold NaN or inf.

    Args:
        model: the module about to be saved.
        where: what would have been written (for the message).
    """
    from optsched.params.classify import unwrap_compiled

    model = unwrap_compiled(model)  # named as in the checkpoint (no "_orig_mod." prefix)
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    if not tensors:
        return
    # Fast path, one sync: a sum is finite only if every element is. Per-tensor sums in fp32 are
    # stacked and checked at once (10x faster than an isfinite pass per tensor on a 50M model).
    device = tensors[0][1].device
    sums = torch.stack([t.detach().sum(dtype=torch.float32).to(device) for _, t in tensors])
    if bool(torch.isfinite(sums).all()):
        return
    # Slow path, exact: a sum may also overflow to inf with finite elements.
    bad = [name for name, t in tensors if not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"refusing to write {where}: the model holds NaN or inf values in {shown}. The previous "
            "checkpoint is kept; lower the learning rate, enable max_grad_norm, or resume from it."
        )


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps and decides, per step, whether to apply or skip it.

    Args:
        max_consecutive: consecutive skips allowed before :class:`NonFiniteError` (0: none).

    Example:
        >>> g = NonFiniteGuard(max_consecutive=2)
        >>> g.should_skip(float("nan"), 1.0, step=1), g.should_skip(0.5, 1.0, step=2)
        (True, False)
        >>> g.skipped_total, g.consecutive
        (1, 0)
    """

    max_consecutive: int = 5
    skipped_total: int = 0
    consecutive: int = 0

    def should_skip(self, loss: float, grad_norm: float | None, step: int) -> bool:
        """True when this step must be skipped; raises once too many steps in a row were skipped.

        Args:
            loss: the step's loss (any finite value passes).
            grad_norm: the step's total gradient norm, or None when it was not computed.
            step: the step number (1-based, for messages).

        Raises:
            NonFiniteError: this is skip number ``max_consecutive + 1`` in a row (the first with 0).
        """
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        what = f"loss={loss!r}, grad_norm={grad_norm!r}"
        if self.consecutive > self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: non-finite values ({what}) in {self.consecutive} consecutive steps, more than "
                f"max_consecutive_nonfinite={self.max_consecutive}; training stops. The last checkpoint "
                "holds finite weights. Lower the learning rate, enable max_grad_norm, check the data, or "
                "raise max_consecutive_nonfinite."
            )
        self.skipped_total += 1
        logger.warning(
            "step %d: non-finite values (%s): optimizer and scheduler step skipped (%d in a row, %d in all; "
            "a run of more than max_consecutive_nonfinite=%d stops training).",
            step, what, self.consecutive, self.skipped_total, self.max_consecutive,
        )
        return True
