"""AdaLomo with a state dict that round-trips (the upstream class saves none of its state).

``lomo_optim.AdaLomo`` keeps its second moments in three dicts keyed by parameter name (``exp_avg_sq``
for vectors, ``exp_avg_sq_row`` / ``exp_avg_sq_col`` for matrices) and its step count in ``step_num``,
all outside ``optimizer.state``: torch's ``state_dict`` sees none of them. A checkpoint then holds no
AdaLomo state, and a resume restarts from zero moments at step 0, whose decay rate differs from the
step it left off at, silently (transformers' Trainer resumes it that way). :func:`with_adalomo_state`
returns a subclass whose ``state_dict`` stores them under ``"state"`` by parameter index, torch's
standard layout, with ``step_num`` in the param group, and whose ``load_state_dict`` copies them back into
upstream's float32 buffers in place: the update itself is upstream's, unchanged.

A state dict written by the upstream class (no ``"state"``, no ``step_num``) loads as before, leaving the
moments as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from optsched.optim._subclass import stand_in_for

__all__ = ["MOMENT_BUFFERS", "with_adalomo_state"]

#: Upstream's per-parameter buffers, each a dict from parameter name to a float32 tensor.
MOMENT_BUFFERS = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")

_SUBCLASSES: dict[type, type] = {}


def with_adalomo_state(cls: type) -> type:
    """A subclass of ``cls`` (``lomo_optim.AdaLomo``) whose state dict holds its moments and step count.

    One subclass per ``cls`` (``isinstance(optimizer, cls)`` holds); every behaviour but ``state_dict`` /
    ``load_state_dict`` is upstream's.
    """
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    class WithAdaLomoState(cls):  # type: ignore[valid-type, misc]
        def _names(self) -> list[str]:
            # the one group holds model.parameters(), in named_parameters() order (shared ones once, both)
            return [name for name, _ in self.model.named_parameters()]

        def state_dict(self) -> dict[str, Any]:
            """torch's state dict, with each parameter's moments under ``"state"`` and ``step_num`` in the group."""
            saved = super().state_dict()
            for index, name in enumerate(self._names()):
                moments = {key: getattr(self, key)[name] for key in MOMENT_BUFFERS if name in getattr(self, key)}
                if moments:
                    saved["state"][index] = {**saved["state"].get(index, {}), **moments}
            saved["param_groups"][0]["step_num"] = self.step_num
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """The moments copied into upstream's buffers (kept float32 on their device: torch's own load
            would cast them to a bf16 model's dtype), then torch's load of the rest.

            Raises:
                ValueError: a saved moment whose shape differs from this model's buffer (another model).
            """
            names = self._names()
            state = dict(state_dict.get("state", {}))
            for index, entry in list(state.items()):
                moments = {k: v for k, v in entry.items() if k in MOMENT_BUFFERS}
                if not moments:
                    continue
                name = names[int(index)] if 0 <= int(index) < len(names) else None
                for key, value in moments.items():
                    buffer = getattr(self, key).get(name) if name is not None else None
                    if buffer is None or buffer.shape != value.shape:
                        raise ValueError(
                            f"optimizer state {index} {key}: shape {tuple(value.shape)} does not fit this model "
                            f"(parameter {name!r}, buffer {None if buffer is None else tuple(buffer.shape)}); "
                            "accepted: a state dict saved by AdaLomo on the same model."
                        )
                    with torch.no_grad():
                        buffer.copy_(value)
                rest = {k: v for k, v in entry.items() if k not in MOMENT_BUFFERS}
                if rest:
                    state[index] = rest
                else:
                    del state[index]
            groups = [dict(g) for g in state_dict["param_groups"]]
            step_num = groups[0].pop("step_num", None) if groups else None
            super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
            if step_num is not None:
                self.step_num = int(step_num)

    stand_in_for(WithAdaLomoState, cls, "its moments and step count saved in its state dict")
    _SUBCLASSES[cls] = WithAdaLomoState
    return WithAdaLomoState
