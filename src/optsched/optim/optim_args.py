"""Parse ``TrainingArguments.optim_args`` into typed values checked against the optimizer's spec.

transformers splits ``"k=v,k=v"`` and mostly leaves the values as strings, converting some with
``float()``/``int()`` and some with ``bool()`` (so ``"False"`` becomes ``True``), and ignores keys it does
not know. Here every key is checked against the spec's declared keys and converted to its declared
type; anything else is a ``ValueError`` that lists the accepted keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from optsched._validation import did_you_mean, parse_json_mapping

__all__ = ["convert_value", "parse_optim_args", "split_pairs"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"one of true/false/1/0/yes/no (a bool), got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"an integer, got the bool {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"a number, got the bool {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise ValueError(f"a number, got {value!r}") from None
    else:
        raise ValueError(f"a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(result):
        raise ValueError(f"a finite number, got {value!r}")
    return result


def _to_str(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"a non-empty string, got {value!r}")


def _to_floats(value: Any) -> tuple[float, ...]:
    # "(0.9,0.95)", "[0.9, 0.95]", "0.9:0.95" (colon form is handy inside "k=v,k=v") or a sequence.
    if isinstance(value, str):
        text = value.strip().strip("()[]")
        parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"a tuple of numbers such as (0.9,0.95), got {value!r}")
    if not parts:
        raise ValueError(f"a non-empty tuple of numbers, got {value!r}")
    return tuple(_to_float(p) for p in parts)


def _to_dtype(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.strip().removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"a torch dtype name such as 'float32' or 'bfloat16', got {value!r}")


#: type name -> converter; a converter raises ValueError("<what is accepted>, got ...").
CONVERTERS: Mapping[str, Callable[[Any], Any]] = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "str": _to_str,
    "floats": _to_floats,
    "dtype": _to_dtype,
}


def convert_value(type_name: str, value: Any) -> Any:
    """Convert one value to a declared ``optim_args`` type (see :data:`CONVERTERS`)."""
    return CONVERTERS[type_name](value)


def split_pairs(text: str) -> dict[str, str]:
    """Split HF's ``"k=v,k=v"`` form into a dict of strings.

    Spaces are ignored (as HF); commas inside brackets do not split, so ``"betas=(0.9,0.95)"`` is
    one pair. An empty string gives ``{}``.

    Raises:
        ValueError: a pair without exactly one ``=``, an empty key, or a repeated key.
    """
    pairs: list[str] = []
    depth, current = 0, []
    for char in text.replace(" ", ""):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            pairs.append("".join(current))
            current = []
        else:
            current.append(char)
    pairs.append("".join(current))
    result: dict[str, str] = {}
    for pair in pairs:
        if not pair:
            continue  # tolerate "a=1," like HF's users write
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"optim_args={text!r} has a malformed pair {pair!r}; accepted: 'key=value' pairs "
                "separated by commas, e.g. 'momentum=0.9,nesterov=true', a dict, or a JSON object."
            )
        if key in result:
            raise ValueError(f"optim_args={text!r} sets {key!r} twice.")
        result[key] = value
    return result


def _raw_mapping(optim_args: Any) -> dict[str, Any]:
    if optim_args is None:
        return {}
    if isinstance(optim_args, Mapping):
        return dict(optim_args)
    if isinstance(optim_args, str):
        if optim_args.strip().startswith("{"):
            return parse_json_mapping("optim_args", optim_args)
        return split_pairs(optim_args)
    raise TypeError(
        f"optim_args must be a 'k=v,k=v' string, a dict or a JSON object string, "
        f"got {type(optim_args).__name__} {optim_args!r}."
    )


def parse_optim_args(name: Any, optim_args: Any) -> dict[str, Any]:
    """Parse and type ``optim_args`` for the optimizer ``name``.

    Args:
        name: a registered optimizer name (``TrainingArguments.optim``).
        optim_args: ``None``, ``"k=v,k=v"`` (HF's form), a dict, or a JSON object string.

    Returns:
        ``{key: typed value}`` for the keys the user gave (defaults are applied by the factory).
        Types follow the spec: ``"False"``/``"0"`` are ``False`` for a bool key, ``"8"`` is ``8`` for
        an int key, ``"(0.9,0.95)"`` is a tuple for a ``floats`` key.

    Raises:
        ValueError: unknown name, unknown key, malformed pair, or a value of the wrong type; the
            message lists the accepted keys.
        TypeError: ``optim_args`` is none of the accepted forms.

    Example:
        >>> parse_optim_args("sgd", "momentum=0.9,nesterov=False")
        {'momentum': 0.9, 'nesterov': False}
    """
    from optsched.optim.spec import get_optimizer_spec

    spec = get_optimizer_spec(name)
    raw = _raw_mapping(optim_args)
    declared = {a.name: a for a in spec.optim_args}
    accepted = ", ".join(f"{a.name} ({a.type})" for a in spec.optim_args) or "none"
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in declared:
            raise ValueError(
                f"optim_args key {key!r} is not accepted by optim={spec.name!r}."
                f"{did_you_mean(str(key), declared)} Accepted keys: {accepted}."
            )
        try:
            parsed[key] = convert_value(declared[key].type, value)
        except ValueError as exc:
            raise ValueError(
                f"optim_args {key}={value!r} for optim={spec.name!r} is not valid; accepted: {exc}. "
                f"Accepted keys: {accepted}."
            ) from None
    return parsed
