"""Shared checks that turn bad input into clear errors.

Every public entry point validates through these helpers so that messages have one shape:
``<field>=<value!r> is <what is wrong>; <what is accepted>.`` plus a "did you mean" for names.

Conventions (see DESIGN.md): ``ValueError`` for a bad value, ``TypeError`` for a wrong type,
``ImportError`` (see :func:`missing_package`) for an optional package that is not installed.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_step_count",
    "integral_to_int",
    "loads_json",
    "closest",
    "did_you_mean",
    "missing_package",
    "parse_json_mapping",
]


def closest(value: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Return up to ``n`` names from ``choices`` that look like ``value`` (best first)."""
    return difflib.get_close_matches(str(value), list(choices), n=n, cutoff=cutoff)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix for an error message, or ``""`` when nothing is close."""
    matches = closest(value, choices)
    if not matches:
        return ""
    if len(matches) == 1:
        return f" Did you mean {matches[0]!r}?"
    return " Did you mean one of " + ", ".join(repr(m) for m in matches) + "?"


def check_choice(field: str, value: Any, choices: Iterable[str], what: str = "name") -> str:
    """Check that ``value`` is one of ``choices``; return it as a plain ``str``.

    Enum members whose value is a string (as transformers' ``OptimizerNames``) are accepted.

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: ``value`` is not in ``choices``; the message lists them and the closest matches.
    """
    choices = list(choices)
    value = getattr(value, "value", value)
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, got {type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValueError(
            f"{field}={value!r} is not a known {what}.{did_you_mean(value, choices)} "
            f"Accepted: {', '.join(sorted(choices))}."
        )
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Check a finite real number within ``[low, high]`` (``low_open``/``high_open`` exclude the end).

    Raises:
        TypeError: not a real number (``bool`` is refused: ``True`` is no learning rate).
        ValueError: NaN, infinite, or out of range.
    """
    if value is None and allow_none:
        return None
    if not _is_real(value):
        raise TypeError(f"{field} must be a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{field}={value!r} is not finite; a finite number is accepted.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low!r}"
        hi = "inf" if high is None else f"{high!r}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{field}={value!r} is out of range; accepted: a number in {interval}.")
    return value


def check_int(
    field: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False
) -> int | None:
    """Check an integer within ``[low, high]``. Floats with an integral value are refused too.

    Raises:
        TypeError: not an ``int`` (``bool`` refused).
        ValueError: out of range.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{field} must be an integer, got {type(value).__name__} {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{field}={value!r} is out of range; accepted: an integer in [{lo}, {hi}].")
    return int(value)


def check_step_count(field: str, value: Any, *, low: int = 0, allow_none: bool = False) -> int | None:
    """A number of steps: an ``int``, or a float with an integral value (returned as ``int``).

    HF's own recipe for the total, ``(len(ds) // batch) * args.num_train_epochs``, is a float
    (``num_train_epochs`` is a float), so ``24.0`` is accepted as 24 steps; ``24.5`` is not.
    """
    return check_int(field, integral_to_int(value), low=low, allow_none=allow_none)


def integral_to_int(value: Any) -> Any:
    """``24.0 -> 24`` and ``numpy.int64(24) -> 24``; anything else (``24.5``, ``None``, ``True``, a
    string) is returned unchanged, for the caller's own check to judge."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def check_bool(field: str, value: Any, allow_none: bool = False) -> bool | None:
    """Check a ``bool`` (``None`` too when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def loads_json(field: str, text: str, accepted: str) -> Any:
    """``json.loads(text)``; invalid JSON is a ``ValueError`` naming the field, the value, where the
    parser stopped and ``accepted`` (what the field takes, with an example)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{field}={text!r} is not valid JSON ({exc.msg} at column {exc.colno}); accepted: {accepted}."
        ) from None


def parse_json_mapping(field: str, value: Any) -> dict[str, Any]:
    """Accept ``None``, a mapping, or a JSON object string; return a new ``dict``.

    Raises:
        TypeError: neither a mapping nor a string.
        ValueError: a string that is not a JSON object.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        parsed = loads_json(field, value, 'a dict or a JSON object string such as \'{"power": 2.0}\'')
        if not isinstance(parsed, dict):
            raise ValueError(
                f"{field}={value!r} is JSON but not an object; accepted: a dict or a JSON object string."
            )
        return parsed
    raise TypeError(f"{field} must be a dict or a JSON string, got {type(value).__name__} {value!r}.")


def missing_package(package: str, extra: str, needed_for: str) -> ImportError:
    """The ``ImportError`` for an optional package: names it and the install command that fixes it."""
    return ImportError(
        f"{needed_for} needs the package {package!r}, which is not installed. "
        f"Install it with: pip install 'optsched[{extra}]'  (or: pip install {package})"
    )
