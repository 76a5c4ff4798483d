"""GrokAdamW with a state dict that round-trips (the upstream class loses its state on reload).

``grokadamw.GrokAdamW`` keeps each parameter's state inside its param group (``group["state"][param]``)
instead of in ``optimizer.state``. ``torch.optim.Optimizer.state_dict`` copies the group as it is, so
the saved file holds the state keyed by the parameter tensors themselves: a reload maps nothing to the
new model's parameters and training continues from zeroed moments (silently; ``torch.load`` with
``weights_only=True`` also has to unpickle those tensors as keys). transformers' Trainer resumes it that
way. :func:`with_standard_state` returns a subclass whose ``state_dict`` moves that state to the
standard ``"state"`` section, keyed by parameter index like every torch optimizer, and whose
``load_state_dict`` moves it back: the update itself is upstream's, unchanged.
"""

from __future__ import annotations

from typing import Any

from optsched.optim._subclass import stand_in_for

__all__ = ["with_standard_state"]

_SUBCLASSES: dict[type, type] = {}


def with_standard_state(cls: type) -> type:
    """A subclass of ``cls`` (``grokadamw.GrokAdamW``) with a state dict in torch's standard layout.

    The subclass keeps the name and every behaviour of ``cls`` except ``state_dict`` /
    ``load_state_dict``; one subclass per ``cls`` (``isinstance(optimizer, cls)`` holds). A state dict
    written by the upstream class loads too, without its state (which that format cannot map).
    """
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    class WithStandardState(cls):  # type: ignore[valid-type, misc]
        def state_dict(self) -> dict[str, Any]:
            """Upstream's state dict, each group's ``"state"`` moved to ``"state"`` by parameter index."""
            saved = super().state_dict()
            for group, packed in zip(self.param_groups, saved["param_groups"]):
                inner = packed.pop("state", None) or {}
                for param, index in zip(group["params"], packed["params"]):
                    if param in inner:  # tensors as keys: looked up by identity
                        saved["state"][index] = dict(inner[param])
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """torch's load (state by index into ``optimizer.state``), then each parameter's state back
            into its group, where the upstream update looks for it."""
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                group["state"] = {p: self.state.pop(p) for p in group["params"] if p in self.state}

    stand_in_for(WithStandardState, cls, "its per-parameter state saved by index")
    _SUBCLASSES[cls] = WithStandardState
    return WithStandardState
