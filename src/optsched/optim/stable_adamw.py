"""StableAdamW (torch-optimi) that picks its Triton kernel from the parameters it will update.

``optimi.StableAdamW(triton=None, foreach=None)`` (what transformers' ``optim="stable_adamw"`` builds)
decides on its first step whether to run its Triton kernel: ``_default_to_triton(params)``, true when
Triton is importable and every parameter sits on a GPU that Triton supports. torch-optimi 0.3.3 makes
that call on the list its step is about to fill, still empty, and ``all([])`` is true: wherever Triton
is installed, CPU parameters go to the Triton kernel too. PyPI's Linux torch wheels (the default
``pip install torch``) bring Triton, so on a machine without a GPU the first step fails with
``RuntimeError: 0 active drivers ([]). There should only be one.`` (transformers' Trainer included).

:func:`with_triton_resolved` returns a subclass that makes the same call upstream meant, on the
group's parameters, before the group's first step: Triton on supported GPUs as before, the for-loop
kernel on CPU (what a CPU-only torch runs). Everything else, the update included, is upstream's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from optsched.optim._subclass import stand_in_for

__all__ = ["with_triton_resolved"]

logger = logging.getLogger(__name__)

_SUBCLASSES: dict[type, type] = {}


def _triton_rule() -> Callable[[list[Any]], bool] | None:
    """torch-optimi's own rule (``optimi.utils._default_to_triton``), or ``None`` where it moved."""
    try:
        from optimi.utils import _default_to_triton
    except ImportError:  # a release that renamed it: leave the choice to upstream
        logger.debug("optimi.utils._default_to_triton not found; StableAdamW chooses its kernel itself")
        return None
    return _default_to_triton


def with_triton_resolved(cls: type) -> type:
    """A subclass of ``cls`` (``optimi.StableAdamW``) whose unset ``triton`` is decided per group from
    the group's parameters before its first step.

    A group with ``triton=None`` and ``foreach=None`` that has not stepped yet gets
    ``triton = _default_to_triton(group["params"])``: false as soon as one parameter is on the CPU
    (or any device Triton does not support). An explicit ``triton=`` or ``foreach=`` is left alone,
    and so is a group that already stepped (or was restored from a state dict). One subclass per
    ``cls``: ``isinstance(optimizer, cls)`` holds and the class keeps its name.
    """
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    rule = _triton_rule()

    class TritonResolved(cls):  # type: ignore[valid-type, misc]
        def step(self, *args: Any, **kwargs: Any) -> Any:
            """Upstream's step, after choosing the kernel of each group that has not stepped yet."""
            if rule is not None:
                for group in self.param_groups:
                    if not group.get("setup", True) and group.get("triton") is None and group.get("foreach") is None:
                        group["triton"] = bool(rule(list(group["params"])))
            return super().step(*args, **kwargs)

    stand_in_for(TritonResolved, cls, "its Triton kernel chosen from the parameters")
    _SUBCLASSES[cls] = TritonResolved
    return TritonResolved
