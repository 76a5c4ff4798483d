"""Parameter rules: per-parameter settings chosen by name (``TrainingArguments.param_rules``).

A rule is a plain mapping, so the same rules are written in Python, YAML and JSON::

    [
        {"params": "encoder.layer.0.*", "lr_mult": 0.1, "name": "frozen_ish"},
        {"params": "re:.*\\.bias$", "weight_decay": 0.0},
        {"params": ["embeddings.*", "pooler.*"], "freeze": true},
        {"params": "classifier.*", "lr": 1e-3, "betas": [0.9, 0.98]},
    ]

Keys of a rule (:data:`RULE_KEYS`; every other key is an optimizer hyperparameter):

* ``params`` (required): a pattern or a list of patterns over **full parameter names**
  (``model.named_parameters()`` names, tied aliases included). A plain pattern is a glob that must
  match the whole name (:func:`fnmatch.fnmatchcase`: ``*`` also crosses dots, ``?`` one character,
  ``[0-3]`` a class); a pattern ``"re:<regex>"`` is a regular expression searched in the name
  (:func:`re.search`: anchor it with ``^``/``$`` when needed).
* ``name``: the rule's name, used as the group name and as the group's ``rule`` key; default: its
  pattern(s) as written (joined by ``","``). Names are unique.
* ``lr`` (an absolute learning rate) or ``lr_mult`` (a multiplier of the base lr), not both.
* ``weight_decay`` (absolute) or ``wd_mult`` (a multiplier of what the decay policy gives: the
  ``weight_decay`` argument for a parameter the policy decays, 0 otherwise), not both.
* ``freeze``: ``True`` leaves the matched parameters out of every group (and
  :func:`optsched.params.freeze_parameters` sets ``requires_grad=False`` on them); no other setting
  may come with it. ``False`` is accepted and changes nothing (the rule still claims the names).
* any other key: an optimizer hyperparameter copied into the group (``betas``, ``eps``,
  ``momentum``, ``nesterov``, ``use_muon`` for ``optim="muon"``, ...). Lists become tuples (YAML has
  no tuples, and groups are merged by value). Which keys the optimizer accepts is checked by
  ``optsched.optim.create_optimizer``, which knows the optimizer; here only the shape is checked.

**The first matching rule decides** every setting of a parameter; later rules are not consulted for
it, and settings the rule does not give fall back to the defaults (the base lr, the decay policy,
the optimizer's own defaults).

This module parses and matches; :mod:`optsched.params.groups` applies the settings.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optsched._validation import check_bool, check_number, closest, did_you_mean, loads_json

__all__ = [
    "RESERVED_GROUP_KEYS",
    "RULE_KEYS",
    "ParamRule",
    "match_rules",
    "normalize_param_rules",
    "parse_param_rules",
]

logger = logging.getLogger(__name__)

#: The keys with a meaning of their own; any other key of a rule is an optimizer hyperparameter.
RULE_KEYS: tuple[str, ...] = ("params", "name", "lr", "lr_mult", "weight_decay", "wd_mult", "freeze")
#: Group keys the builder writes itself (the param-group contract): a rule may not set them.
RESERVED_GROUP_KEYS: frozenset[str] = frozenset(
    {"param_names", "rule", "layer_id", "initial_lr", "group_name", "names"}
)
REGEX_PREFIX = "re:"
# A hyperparameter key this close to a rule key is taken for a typo of it ("lr_mul", "freez").
_TYPO_CUTOFF = 0.75


@dataclass(frozen=True)
class ParamRule:
    """One parsed, validated rule. Immutable; build with :func:`parse_param_rules`.

    Attributes:
        index: position in the rule list (``param_rules[index]`` in messages).
        name: the rule's name (see the module docstring for the default).
        patterns: the patterns as written.
        lr, lr_mult, weight_decay, wd_mult: ``None`` when not set.
        freeze: the parameters are left out of every group.
        hyperparameters: ``(key, value)`` pairs copied into the group, values made hashable.
    """

    index: int
    name: str
    patterns: tuple[str, ...]
    lr: float | None = None
    lr_mult: float | None = None
    weight_decay: float | None = None
    wd_mult: float | None = None
    freeze: bool = False
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    _regex: re.Pattern = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def label(self) -> str:
        """``param_rules[i] ('name')``: how messages refer to the rule."""
        return f"param_rules[{self.index}] ({self.name!r})"

    def matches(self, name: str) -> bool:
        """Whether the full parameter name ``name`` matches one of the rule's patterns."""
        return self._regex.search(name) is not None


def _hashable(value: Any) -> Any:
    """Lists (YAML, JSON) -> tuples, recursively, so group settings compare and hash by value."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"a rule hyperparameter value must be a number, string, bool or a list of them, got "
            f"{type(value).__name__} {value!r}."
        ) from None
    return value


def _compile(patterns: Sequence[str], where: str) -> re.Pattern:
    """One regex for all patterns: globs become anchored regexes, ``re:`` patterns are searched."""
    parts = []
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            body = pattern[len(REGEX_PREFIX):]
            try:
                re.compile(body)
            except re.error as exc:
                raise ValueError(
                    f"{where} has params={pattern!r}, which is not a valid regular expression ({exc}); "
                    "accepted: a glob over full parameter names ('encoder.layer.0.*') or 're:' "
                    "followed by a Python regex ('re:\\.bias$')."
                ) from None
            parts.append(f"(?:{body})")
        else:
            # fnmatch.translate gives (?s:...)\Z, a whole-name match; anchor the start as well.
            parts.append(f"^{fnmatch.translate(pattern)}")
    return re.compile("|".join(parts))


def _patterns(raw: Any, where: str) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(
            f"{where} params must be a pattern string or a non-empty list of them, "
            f"got {type(raw).__name__} {raw!r}."
        )
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{where} params must hold strings, got {type(item).__name__} {item!r}.")
        if not item.strip() or item == REGEX_PREFIX:
            raise ValueError(f"{where} has an empty pattern {item!r}; accepted: a glob or 're:<regex>'.")
    return tuple(items)


def _check_hyperparameter_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{where} keys must be strings, got {type(key).__name__} {key!r}.")
    accepted = f"ccepted: {', '.join(RULE_KEYS)} or an optimizer hyperparameter (betas, eps, momentum, ...)."
    if key in RESERVED_GROUP_KEYS:
        raise ValueError(f"{where} sets {key!r}, which the group builder writes itself; a{accepted}")
    typo = closest(key, RULE_KEYS, n=1, cutoff=_TYPO_CUTOFF)
    if typo or not key.isidentifier():
        raise ValueError(f"{where} has an unknown key {key!r}.{did_you_mean(key, RULE_KEYS)} A{accepted}")
    return key


def _one_rule(index: int, raw: Any) -> ParamRule:
    where = f"param_rules[{index}]"
    if isinstance(raw, ParamRule):
        return raw if raw.index == index else _one_rule(index, raw_rule_dict(raw))
    if not isinstance(raw, Mapping):
        raise TypeError(f"{where} must be a dict such as {{'params': '*.bias', 'weight_decay': 0.0}}, "
                        f"got {type(raw).__name__} {raw!r}.")
    if "params" not in raw:
        raise ValueError(
            f"{where} {dict(raw)!r} has no 'params' key{did_you_mean(next(iter(raw), ''), ['params'])}; "
            "accepted: a dict with 'params' (a glob or 're:<regex>' over full parameter names, or a "
            "list of them) and settings such as lr_mult, weight_decay, freeze."
        )
    patterns = _patterns(raw["params"], where)
    name = raw.get("name", ",".join(patterns))
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{where} name must be a non-empty string, got {type(name).__name__} {name!r}.")
    where = f"param_rules[{index}] ({name!r})"
    regex = _compile(patterns, where)

    def number(key: str) -> float | None:
        if key not in raw:
            return None
        return float(check_number(f"{where} {key}", raw[key], low=0.0))

    lr, lr_mult, wd, wd_mult = number("lr"), number("lr_mult"), number("weight_decay"), number("wd_mult")
    for a, b, what in (("lr", "lr_mult", "learning rate"), ("weight_decay", "wd_mult", "weight decay")):
        if a in raw and b in raw:
            raise ValueError(
                f"{where} sets both {a}={raw[a]!r} and {b}={raw[b]!r}; accepted: one of them "
                f"({a} is an absolute {what}, {b} multiplies the default one)."
            )
    freeze = check_bool(f"{where} freeze", raw.get("freeze", False))
    hyper = []
    for key, value in raw.items():
        if key in RULE_KEYS:
            continue
        _check_hyperparameter_key(key, where)
        try:
            hyper.append((key, _hashable(value)))
        except TypeError as exc:
            raise TypeError(f"{where} {key}: {exc}") from None
    if freeze:
        extra = [k for k in raw if k not in ("params", "name", "freeze")]
        if extra:
            raise ValueError(
                f"{where} has freeze=True together with {extra}; a frozen parameter is in no group, so "
                "nothing can be set on it. Accepted: freeze=True with only params and name."
            )
    return ParamRule(index, name, patterns, lr, lr_mult, wd, wd_mult, freeze, tuple(hyper), regex)


def raw_rule_dict(rule: ParamRule) -> dict[str, Any]:
    """A parsed rule back as a plain dict (JSON/YAML-ready: tuples become lists)."""

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    out: dict[str, Any] = {"params": rule.patterns[0] if len(rule.patterns) == 1 else list(rule.patterns)}
    if rule.name != ",".join(rule.patterns):
        out["name"] = rule.name
    for key in ("lr", "lr_mult", "weight_decay", "wd_mult"):
        if getattr(rule, key) is not None:
            out[key] = getattr(rule, key)
    if rule.freeze:
        out["freeze"] = True
    out.update((k, plain(v)) for k, v in rule.hyperparameters)
    return out


def parse_param_rules(rules: Any, field_name: str = "param_rules") -> tuple[ParamRule, ...]:
    """Validate rules and return them parsed, in order.

    Args:
        rules: ``None``, a list of rule dicts (or :class:`ParamRule`), or a JSON string of such a list.
        field_name: the name used in messages.

    Returns:
        The parsed rules; ``()`` for ``None``, ``""`` or ``[]``.

    Raises:
        TypeError: not a list (or JSON list) of dicts; a value of the wrong type.
        ValueError: no ``params``; an unknown key (with "did you mean"); ``lr`` with ``lr_mult`` or
            ``weight_decay`` with ``wd_mult``; a bad regex; a negative or non-finite number;
            ``freeze=True`` with settings; two rules with the same name.
    """
    if rules is None:
        return ()
    if isinstance(rules, str):
        text = rules.strip()
        if not text:
            return ()
        rules = loads_json(
            field_name, rules, 'a list of rules such as \'[{"params": "*.bias", "weight_decay": 0.0}]\''
        )
    if isinstance(rules, Mapping) or not isinstance(rules, (list, tuple)):
        raise TypeError(
            f"{field_name} must be a list of rule dicts (or a JSON list), got {type(rules).__name__} "
            f"{rules!r:.200}."
        )
    parsed = tuple(_one_rule(i, raw) for i, raw in enumerate(rules))
    seen: dict[str, int] = {}
    for rule in parsed:
        if rule.name in seen:
            raise ValueError(
                f"{field_name}[{rule.index}] has the name {rule.name!r} of {field_name}[{seen[rule.name]}]; "
                "accepted: a unique name per rule (names become group names)."
            )
        seen[rule.name] = rule.index
    return parsed


def normalize_param_rules(rules: Any, field_name: str = "param_rules") -> list[dict[str, Any]] | None:
    """Validate rules and return them as plain dicts (what ``TrainingArguments.param_rules`` stores).

    Each rule is kept as written (a deep copy; a JSON string is parsed), so it serialises to JSON/YAML
    unchanged; ``None`` and ``[]`` stay as given. Raises as :func:`parse_param_rules`.
    """
    parse_param_rules(rules, field_name)
    if rules is None:
        return None
    if isinstance(rules, str):
        return json.loads(rules) if rules.strip() else None
    return [raw_rule_dict(r) if isinstance(r, ParamRule) else json.loads(json.dumps(dict(r))) for r in rules]


def match_rules(
    rules: Sequence[ParamRule],
    names: Sequence[str],
    all_names: Iterable[str] | None = None,
    frozen_names: Iterable[str] = (),
) -> list[ParamRule | None]:
    """The first matching rule of each name (``None``: no rule matches).

    Every rule must match at least one name of ``all_names`` (default ``names``; pass every name of
    the model, frozen and tied aliases included, so a rule over frozen parameters is no error). A
    rule that decides none of ``names`` is logged as a warning (it has no effect), except a freeze
    rule whose parameters are already frozen (``frozen_names``).

    Raises:
        ValueError: a rule matches no parameter name; the message names the closest ones.
    """
    decided: list[ParamRule | None] = []
    for name in names:
        decided.append(next((rule for rule in rules if rule.matches(name)), None))
    universe = list(names) if all_names is None else list(all_names)
    frozen_names = list(frozen_names)
    claimed = {id(rule) for rule in decided if rule is not None}
    for rule in rules:
        if id(rule) in claimed:
            continue
        if not any(rule.matches(n) for n in universe):
            raise ValueError(
                f"{rule.label} with params={list(rule.patterns)!r} matches no parameter of the model."
                f"{_closest_names(rule.patterns, universe)} Patterns are globs over full names "
                "('encoder.layer.0.*'; '*' also crosses dots) or 're:<regex>' searched in the name."
            )
        shadowed = [n for n in names if rule.matches(n)]  # trainable, but an earlier rule decides them
        if rule.freeze and any(rule.matches(n) for n in frozen_names):  # it froze (or found frozen) some
            if shadowed:
                logger.warning(
                    "%s leaves %d of its parameters trainable: an earlier rule decides them (the first match "
                    "wins), e.g. %s.", rule.label, len(shadowed), ", ".join(repr(n) for n in shadowed[:3]),
                )
            else:
                logger.debug("%s matches only parameters that are frozen", rule.label)
        elif shadowed:
            logger.warning(
                "%s matches only parameters an earlier rule already decides (the first match wins); "
                "it has no effect.", rule.label,
            )
        else:
            logger.warning(
                "%s matches only frozen parameters or later names of tied tensors (a tied tensor is "
                "decided by its first name); it has no effect.", rule.label,
            )
    return decided


def _closest_names(patterns: Sequence[str], names: Sequence[str]) -> str:
    """`` Closest parameter names: 'a', 'b'.`` (by the pattern's literal text), for the error message."""
    candidates: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            candidates[".".join(parts[:i])] = None
    found: list[str] = []
    for pattern in patterns:
        literal = pattern[len(REGEX_PREFIX):] if pattern.startswith(REGEX_PREFIX) else pattern
        literal = re.sub(r"[\\^$*?+\[\](){}|]", "", literal).strip(".")
        for match in closest(literal, candidates, n=3, cutoff=0.5):
            # show a parameter name under the closest prefix, so the user sees a real full name
            full = next((n for n in names if n == match or n.startswith(match + ".")), match)
            shown = full if full == match else f"{match}.* (e.g. {full!r})"
            if shown not in found:
                found.append(shown)
    if not found:
        sample = ", ".join(repr(n) for n in list(names)[:5])
        return f" Some parameter names: {sample}{', ...' if len(names) > 5 else ''}."
    return " Closest parameter names: " + ", ".join(f"{f!r}" if "e.g." not in f else f for f in found[:5]) + "."
