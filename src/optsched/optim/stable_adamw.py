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
kernel on CPU (what a CPU-only torch runs). A state dict brings the choice of the machine that saved
it (``triton=True`` from a CUDA run), which upstream's step then runs whatever the parameters are now:
the subclass re-decides it after ``load_state_dict`` where Triton cannot run. Everything else, the
update included, is upstream's.
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

    ``load_state_dict`` then revisits each group whose loaded ``triton`` is true (saved where Triton ran):
    a choice the group held before the load (an explicit ``triton=`` or ``foreach=`` of this optimizer,
    or what its first step resolved here) replaces it; without one, where Triton cannot run on the
    group's parameters (``_default_to_triton`` false: CPU, a GPU without bf16, no Triton), ``triton``
    becomes false, upstream's own choice for them. Either change is logged (info). A loaded ``triton``
    that is false or unset is kept: switching to Triton would need the scratch tensors Triton's state
    has and the others' lack. Switching away is safe: the for-loop and foreach kernels ignore those
    (``mean_square``, and ``kahan_comp`` of one element beside full-precision parameters), which stay.
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

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Upstream's load, then the kernel of each group loaded with ``triton`` true re-decided here."""
            held = [(group.get("triton"), group.get("foreach")) for group in self.param_groups]
            super().load_state_dict(state_dict)
            for index, (group, (triton, foreach)) in enumerate(zip(self.param_groups, held)):
                if not group.get("triton"):
                    continue
                params = list(group["params"])
                if triton is not None or foreach is not None:
                    why = "the choice this optimizer held before the load"
                elif rule is not None and not rule(params):
                    triton, why = False, "upstream's _default_to_triton: Triton cannot run on them"
                else:
                    continue  # Triton runs here too: the loaded choice stands
                if (group.get("triton"), group.get("foreach")) == (triton, foreach):
                    continue
                logger.info(
                    "StableAdamW group %d%s was loaded with triton=True (the kernel of the machine that saved "
                    "it); its parameters are on %s: now triton=%r, foreach=%r (%s).",
                    index, f" ({group['name']!r})" if group.get("name") is not None else "",
                    ", ".join(sorted({str(p.device) for p in params})) or "no device", triton, foreach, why,
                )
                group["triton"], group["foreach"] = triton, foreach

    stand_in_for(TritonResolved, cls, "its Triton kernel chosen from the parameters")
    _SUBCLASSES[cls] = TritonResolved
    return TritonResolved
