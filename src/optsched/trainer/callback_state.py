"""Stateful callbacks: their states in ``trainer_state.json``'s ``stateful_callbacks``, and their restore.

A callback is stateful when a class of its MRO is named ``ExportableState``: transformers' class (its
``EarlyStoppingCallback`` is one, and its ``TrainerControl``) or this module's :class:`ExportableState`,
so transformers is never imported. Each gives ``state() -> {"args": {...}, "attributes": {...}}``.

The layout is transformers': ``stateful_callbacks`` maps a class name to its state, or to a list of states
for several callbacks of one class (in the callbacks' order); ``"TrainerControl"`` holds the control's. A
checkpoint written by either Trainer therefore restores into the other.

With ``restore_callback_states_from_checkpoint`` a resume rebuilds each callback whose class name is stored
(and the control) as transformers' ``_load_callback_state`` does: ``type(callback)(**args)``, then each
attribute set; the checkpoint's state replaces the one the callback was constructed with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ExportableState", "export_states", "is_exportable", "restore_states"]

#: The key of the control's state (transformers' class name).
CONTROL_KEY = "TrainerControl"


class ExportableState:
    """A callback (or the control) whose state a checkpoint keeps; transformers' ``ExportableState`` API.

    ``state()`` returns ``{"args": constructor arguments, "attributes": attributes to set after}``, JSON
    values only; :meth:`from_state` builds an instance back from it.
    """

    def state(self) -> dict[str, Any]:
        """The ``{"args": {...}, "attributes": {...}}`` that :meth:`from_state` rebuilds this object from."""
        raise NotImplementedError(f"{type(self).__name__} must implement state() to be saved with checkpoints.")

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ExportableState:
        """``cls(**state["args"])`` with each of ``state["attributes"]`` set.

        Raises:
            TypeError: ``state`` is not of that layout, or ``cls`` does not accept its ``args``.
        """
        return _rebuild(cls, cls.__name__, state)


def is_exportable(obj: Any) -> bool:
    """Whether ``obj`` is stateful: a class of its MRO is named ``ExportableState`` (transformers' or ours)."""
    return any(cls.__name__ == "ExportableState" for cls in type(obj).__mro__)


def export_states(callbacks: Sequence[Any], control: Any, stored: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``stateful_callbacks`` for a checkpoint: ``stored`` with the current state of every stateful callback
    and of ``control``, by class name (a list for several of one class).

    Entries of ``stored`` whose class is not among the callbacks are kept, as transformers keeps them. Unlike
    transformers (5.23), a class's entry is replaced at each save: transformers appends to an entry that is a
    list, so several callbacks of one class save a list that grows at every checkpoint and restore their
    states from the start of training, and it fails (``KeyError``) on a stateful callback added after
    ``train()`` began or absent from the resumed checkpoint.
    """
    out = dict(stored or {})
    grouped: dict[str, list[Any]] = {}
    for obj in (*callbacks, control):
        if is_exportable(obj):
            grouped.setdefault(type(obj).__name__, []).append(obj.state())
    for name, states in grouped.items():
        out[name] = states[0] if len(states) == 1 else states
    return out


def restore_states(callbacks: Sequence[Any], control: Any, stored: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """``(callbacks, control)`` with those of a class named in ``stored`` rebuilt from their saved states.

    transformers' rule: the callbacks (and the control) of one class name are paired in order with its saved
    states (one state is a list of one); a callback left without a state keeps its own, a state left without
    a callback is dropped. A stored class absent from the callbacks is named in a warning and ignored. A
    rebuilt callback takes the place of the one it replaces (transformers moves it to the end of the list).

    Raises:
        TypeError: a saved state that is not ``{"args": {...}, "attributes": {...}}``, or whose ``args`` the
            callback's class does not accept (the message names the class and the state).
    """
    objects = [*callbacks, control]
    restored = list(objects)
    not_found = []
    for name, data in stored.items():
        positions = [i for i, obj in enumerate(objects) if type(obj).__name__ == name]
        if not positions:
            not_found.append(name)
            continue
        for i, state in zip(positions, data if isinstance(data, list) else [data]):
            restored[i] = _rebuild(type(objects[i]), name, state)
    if not_found:
        logger.warning("The checkpoint holds the states of callbacks this Trainer does not have; ignored: %s.",
                       ", ".join(not_found))
    return restored[:-1], restored[-1]


def _rebuild(cls: type, name: str, state: Any) -> Any:
    """``cls(**state["args"])`` with ``state["attributes"]`` set (transformers' way)."""
    args = state.get("args", {}) if isinstance(state, Mapping) else None
    attributes = state.get("attributes", {}) if isinstance(state, Mapping) else None
    if not isinstance(args, Mapping) or not isinstance(attributes, Mapping):
        raise TypeError(
            f"stateful_callbacks[{name!r}] in trainer_state.json is {state!r:.200}; accepted: "
            "{'args': {...}, 'attributes': {...}} (transformers' ExportableState.state() layout)."
        )
    try:
        new = cls(**args)
    except TypeError as exc:
        raise TypeError(
            f"stateful_callbacks[{name!r}] in trainer_state.json cannot rebuild {cls.__qualname__}"
            f"(**{dict(args)!r:.200}): {exc}. Accepted: the arguments its state() saved; or resume with "
            "restore_callback_states_from_checkpoint=False to keep the callback as constructed."
        ) from None
    for attribute, value in attributes.items():
        setattr(new, attribute, value)
    return new
