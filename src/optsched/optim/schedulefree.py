"""Schedule-free optimizers (``schedulefree`` package): warmup given in steps, train/eval modes.

transformers passes ``args.warmup_steps`` unconverted, so ``warmup_steps=0.1`` (a ratio in
transformers 5) reaches ``AdamWScheduleFree`` as 0.1 *steps*. Here the warmup is always an integer
number of steps, resolved with transformers' rule ``int(w)`` if ``w >= 1`` else ``ceil(T * w)``:

* ``warmup_steps >= 1`` (or 0): used as is; no ``T`` needed.
* ``0 < warmup_steps < 1`` (or a ``warmup_ratio`` field > 0): needs ``T``: pass
  ``num_training_steps=`` to ``create_optimizer`` / ``get_optimizer_cls_and_kwargs``; without it
  this is a ``ValueError`` rather than a silently wrong warmup.

These optimizers keep two points (the averaged ``x`` and the gradient point ``y``): call
``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluation and before
saving the model. optsched's Trainer does both.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["build_schedule_free", "resolve_warmup_steps"]


def resolve_warmup_steps(args: Any, num_training_steps: int | None, optimizer_name: str) -> int:
    """The warmup of ``args`` as an integer number of optimizer steps (see the module docstring).

    Raises:
        ValueError: the warmup is a ratio and ``num_training_steps`` is unknown.
    """
    warmup = getattr(args, "warmup_steps", 0) or 0
    ratio = getattr(args, "warmup_ratio", 0) or 0
    if warmup >= 1:
        return int(warmup)
    if warmup == 0 and ratio == 0:
        return 0
    fraction = warmup if warmup > 0 else ratio
    if num_training_steps is None:
        raise ValueError(
            f"warmup={fraction!r} is a ratio of the training steps, which optim={optimizer_name!r} needs "
            "as a number of steps; accepted: pass num_training_steps= to create_optimizer(), or give "
            "warmup_steps as an integer >= 1."
        )
    get_warmup_steps = getattr(args, "get_warmup_steps", None)
    if callable(get_warmup_steps):
        return int(get_warmup_steps(num_training_steps))
    return math.ceil(num_training_steps * fraction)


def build_schedule_free(ctx: Any, *, warmup: bool) -> tuple[Any, dict[str, Any]]:
    """Builder hook: adds ``warmup_steps`` (in steps) for the variants that take one."""
    kwargs = dict(ctx.kwargs)
    if warmup:
        kwargs["warmup_steps"] = resolve_warmup_steps(ctx.args, ctx.num_training_steps, ctx.spec.name)
    return ctx.cls, kwargs
