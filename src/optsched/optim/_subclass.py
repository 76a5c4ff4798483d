"""How optsched's subclasses of upstream optimizer classes present themselves (one place for the rule)."""

from __future__ import annotations

__all__ = ["stand_in_for"]


def stand_in_for(subclass: type, cls: type, what: str) -> type:
    """Give ``subclass`` (of ``cls``) the name of ``cls`` and a docstring saying what differs.

    ``_optsched_wraps`` records the upstream class: ``optsched.memory`` infers the optimizer's name
    from it. Returns ``subclass``.
    """
    subclass._optsched_wraps = cls
    subclass.__name__ = cls.__name__
    subclass.__qualname__ = cls.__qualname__
    subclass.__doc__ = f"{cls.__module__}.{cls.__qualname__}, {what}."
    return subclass
