"""Build optimizer parameter groups: transformers' decay / no-decay split, in linear time.

The flow is ``classify_parameters`` (facts) -> a decay policy (decision per tensor) ->
:func:`assemble_groups` (one group per distinct (name, settings), in first-seen order). The builder
knows nothing of optimizers: it returns plain dicts that any ``torch.optim.Optimizer`` accepts, with
the keys of the param-group contract (docs/architecture.md):

* ``params``: the tensors, in ``model.named_parameters()`` order, each once, frozen ones never;
* ``param_names``: their names (the first name of a tied tensor);
* ``name``: ``"decay"`` or ``"no_decay"``;
* ``weight_decay``: ``args.weight_decay`` for ``"decay"``, ``0.0`` for ``"no_decay"``.

With parameter rules (:mod:`optsched.params.rules`) or layer-wise lr decay
(:mod:`optsched.params.layers`) the groups are finer: one per (rule, decay decision, layer), merged
whenever they share all settings, and each also carries

* ``rule``: the name of the rule that decided its tensors, or ``"policy:<decay policy>"`` when no
  rule matched them;
* ``lr``: the group's own base lr, with every multiplier baked in (see :func:`build_param_groups`),
  when a rule or the layer decay sets it;
* ``layer_id``: the layer (0 embeddings, ``1..L`` blocks, ``L + 1`` head) under layer-wise decay;
* the optimizer hyperparameters a rule sets (``betas``, ``momentum``, ``use_muon``, ...).

transformers' ``Trainer.create_optimizer`` tests ``n in decay_parameters`` against a list for every
parameter, which is quadratic (about 9 s at 40,000 tensors); here every test is a set or dict look-up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from optsched._validation import check_number
from optsched.params.classify import ParamInfo, classify_parameters, unwrap_compiled
from optsched.params.layers import (
    LayerIdFn,
    check_layerwise_lr_decay,
    layer_lr_scale,
    resolve_layer_id_fn,
    trainable_layer_ids,
)
from optsched.params.policies import DecayPolicy, resolve_decay_policy
from optsched.params.rules import ParamRule, match_rules, parse_param_rules

__all__ = [
    "DECAY_GROUP",
    "NO_DECAY_GROUP",
    "assemble_groups",
    "build_param_groups",
    "freeze_parameters",
    "get_decay_parameter_names",
    "resolve_weight_decay",
]

logger = logging.getLogger(__name__)

DECAY_GROUP = "decay"
NO_DECAY_GROUP = "no_decay"
#: transformers' default ``learning_rate``: the base lr of rule / layer-decay groups without ``args``.
DEFAULT_LEARNING_RATE = 5e-5


def get_decay_parameter_names(model: nn.Module, *, decay_policy: str | DecayPolicy = "hf") -> list[str]:
    """The names of the parameters that weight decay applies to.

    With the default policy this is the set transformers' ``Trainer.get_decay_parameter_names``
    returns, exactly, for the parameters inside a transformers model (a ``PreTrainedModel``), and for
    the rest of a model the same rule made robust: every norm layer is recognised by type (not only
    ``nn.LayerNorm``), and ``bias`` is a word of a name, not a substring (see
    :mod:`optsched.params.classify`). Like transformers, the names of frozen parameters and every
    name of a tied tensor are included; the decision is by name only.

    Args:
        model: any ``torch.nn.Module``.
        decay_policy: a policy name (``"hf"``, ``"ndim"``, ``"hf+no_embeddings"``, ...; see
            :mod:`optsched.params.policies`) or a callable ``ParamInfo -> bool``.

    Returns:
        Names in ``model.named_parameters(remove_duplicate=False)`` order. Linear time.

    Raises:
        TypeError: ``model`` is not a module, or the policy is neither a name nor a callable or does
            not return a bool.
        ValueError: an unknown policy name.
    """
    infos = classify_parameters(model)
    decisions = _decide_all(resolve_decay_policy(decay_policy), infos)
    return [info.name for info, decides in zip(infos, decisions) if decides]


def resolve_weight_decay(args: Any = None, weight_decay: float | None = None) -> float:
    """The weight decay of the ``"decay"`` group: ``weight_decay`` if given, else ``args.weight_decay``.

    ``args`` may be optsched's or transformers' ``TrainingArguments`` (or any object with a
    ``weight_decay`` attribute); with neither, transformers' default ``0.0``.

    Raises:
        TypeError: ``args`` has no ``weight_decay`` attribute, or the value is not a number.
        ValueError: the value is negative, NaN or infinite.
    """
    if weight_decay is None and args is not None:
        if not hasattr(args, "weight_decay"):
            raise TypeError(
                f"args must be a TrainingArguments (optsched's or transformers') or an object with a "
                f"weight_decay attribute, got {type(args).__name__} {args!r:.80}."
            )
        weight_decay = args.weight_decay
    if weight_decay is None:
        return 0.0
    return float(check_number("weight_decay", weight_decay, low=0.0))


def assemble_groups(
    entries: Iterable[tuple[ParamInfo, str, Mapping[str, Any]]],
    seed: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> list[dict[str, Any]]:
    """Form param groups from per-tensor decisions, merging tensors with the same name and settings.

    Each entry is ``(info, group_name, settings)``. Tensors with an equal ``(group_name, settings)``
    share a group; groups come in the order of ``seed`` first (present even when empty), then in the
    order their first tensor appears. Within a group tensors keep the order of ``entries``.

    Args:
        entries: ``(ParamInfo, group name, settings)`` per tensor; settings values must be hashable.
        seed: ``(group name, settings)`` groups created up front, in this order.

    Returns:
        Dicts ``{"params", "param_names", "name", **settings}``.
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    # Entries usually share a few settings objects: look them up by identity first, skipping the
    # sort. The cache holds each settings object, so its id cannot be reused by another during the loop.
    by_identity: dict[tuple[str, int], tuple[Mapping[str, Any], dict[str, Any]]] = {}

    def group_for(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        cached = by_identity.get((name, id(settings)))
        if cached is not None:
            return cached[1]
        key = (name, *sorted(settings.items()))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"params": [], "param_names": [], "name": name, **settings}
        by_identity[(name, id(settings))] = (settings, group)
        return group

    for name, settings in seed:
        group_for(name, settings)
    for info, name, settings in entries:
        cached = by_identity.get((name, id(settings)))
        group = cached[1] if cached is not None else group_for(name, settings)
        group["params"].append(info.param)
        group["param_names"].append(info.name)
    return list(groups.values())


def build_param_groups(
    model: nn.Module,
    args: Any = None,
    *,
    weight_decay: float | None = None,
    decay_policy: str | DecayPolicy | None = None,
    param_rules: Any = None,
    layerwise_lr_decay: float | None = None,
    layer_id_fn: LayerIdFn | str | None = None,
    learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """The param groups of ``model``: transformers' ``[decay, no_decay]``, or finer with rules / layer decay.

    Each setting comes from its keyword when given, else from the ``args`` field of the same name
    (optsched's ``TrainingArguments`` has them all; transformers' only ``weight_decay`` and
    ``learning_rate``), else from its default.

    **Without rules and layer decay** (the default): ``decay`` holds the trainable tensors the policy
    decays, with ``weight_decay``; ``no_decay`` the others, with ``0.0``. Both groups are always
    returned, in this order, even when one is empty, as transformers does: an optimizer state saved
    by transformers' Trainer then loads into an optimizer built from these groups, and back.

    **With ``param_rules`` and/or ``layerwise_lr_decay``**, for each trainable tensor (by its first
    name) the first matching rule decides (:mod:`optsched.params.rules`), then::

        lr           = rule.lr                                    if the rule sets lr
                     = base_lr * d ** (L + 1 - layer) * lr_mult   otherwise (each factor only if set)
        weight_decay = rule.weight_decay                          if the rule sets weight_decay
                     = policy_wd * wd_mult                        otherwise (wd_mult only if set)

    where ``policy_wd`` is ``weight_decay`` when the decay policy decays the tensor and 0 otherwise,
    and ``layer`` is its layer id (:mod:`optsched.params.layers`). So an ``lr_mult`` multiplies the
    layer-decayed lr, and an absolute ``lr`` replaces both. The lr is baked into each group's own
    ``lr``, so any scheduler that scales ``group["lr"]`` from the group's initial value (optsched's
    ``ScheduleLR``, torch's ``LambdaLR``, ``CosineAnnealingLR``, ...) keeps the ratios. A group
    without an ``lr`` key (no rule or layer decay set one) uses the optimizer's ``lr``.

    Tensors are grouped by (rule, decay decision, layer); groups sharing every setting are merged,
    in the order their first tensor appears, so the number of groups does not grow with the depth of
    the model unless layer decay is on (then one or two per layer). Group names join the parts that
    decided: ``"<rule name>"`` (when the rule sets ``weight_decay``) or ``"<rule name>/decay"`` /
    ``"<rule name>/no_decay"`` (when the policy did), ``"decay"`` / ``"no_decay"`` for tensors no rule
    matched, plus ``"/layer_<i>"`` under layer decay. Empty groups are left out.

    A ``torch.compile``'d model (an ``OptimizedModule``) is grouped as the module it wraps: its
    ``param_names``, and the names ``param_rules`` and layer decay match, are those of the uncompiled
    model, without the ``_orig_mod.`` prefix, so both get the same groups and optimizer state
    (:func:`~optsched.params.classify.unwrap_compiled`).

    Frozen tensors (``requires_grad=False``) and tensors a ``freeze`` rule matches are in no group
    (this function never changes the model; :func:`freeze_parameters`, which ``create_optimizer``
    calls, also sets ``requires_grad=False`` on the latter). A tied tensor is in one group once,
    under its first name, decided by that name.

    Args:
        model: the model.
        args: optsched's or transformers' ``TrainingArguments`` (or any object with the attributes
            used), or ``None``.
        weight_decay: overrides ``args.weight_decay`` (default 0.0).
        decay_policy: overrides ``args.decay_policy`` (default ``"hf"``): a policy name (``"hf"``,
            ``"ndim"``, ``"hf+no_embeddings"``, ...; see :mod:`optsched.params.policies`) or a
            callable ``ParamInfo -> bool``.
        param_rules: overrides ``args.param_rules``: a list of rule dicts or a JSON string.
        layerwise_lr_decay: overrides ``args.layerwise_lr_decay``: ``None`` (off) or ``d`` in (0, 1].
        layer_id_fn: overrides ``args.layer_id_fn``: ``name -> block index | None`` or an import
            path ``"module:function"``.
        learning_rate: overrides ``args.learning_rate`` (default 5e-5): the base lr of the groups.

    Returns:
        Dicts ``{"params", "param_names", "name", "weight_decay", ...}`` (the param-group contract in
        docs/architecture.md).

    Raises:
        ValueError: the model has no trainable parameter (left); a bad ``weight_decay``; an unknown
            policy; a bad rule or a rule that matches no parameter (naming the closest names); a
            layer decay with no layer found.
        TypeError: ``model`` is not a module; ``args`` has no ``weight_decay``; a value of the wrong type.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> [(g["name"], g["param_names"], g["weight_decay"])
        ...  for g in build_param_groups(model, weight_decay=0.01)]
        [('decay', ['0.weight'], 0.01), ('no_decay', ['0.bias', '1.weight', '1.bias'], 0.0)]
        >>> [(g["name"], g.get("lr"), g["weight_decay"], g["rule"]) for g in build_param_groups(
        ...     model, weight_decay=0.01, learning_rate=1e-3,
        ...     param_rules=[{"params": "1.*", "lr_mult": 0.5, "name": "norm"}])]
        [('decay', None, 0.01, 'policy:hf'), ('no_decay', None, 0.0, 'policy:hf'), ('norm/no_decay', 0.0005, 0.0, 'norm')]
    """
    check_number("learning_rate", learning_rate, low=0.0, allow_none=True)  # checked even when no rule uses it
    wd = resolve_weight_decay(args, weight_decay)
    policy = _setting(decay_policy, args, "decay_policy", "hf")
    decays = resolve_decay_policy(policy)
    rules = parse_param_rules(_setting(param_rules, args, "param_rules", None))
    decay = check_layerwise_lr_decay("layerwise_lr_decay", _setting(layerwise_lr_decay, args, "layerwise_lr_decay", None))
    id_fn = resolve_layer_id_fn(_setting(layer_id_fn, args, "layer_id_fn", None))
    model = unwrap_compiled(model)  # the names of the model itself, not "_orig_mod.<name>"
    infos = classify_parameters(model)
    trainable = [info for info in infos if info.alias_of is None and not info.frozen]
    if not trainable:
        _raise_no_trainable(model, infos, "")
    decisions = _decide_all(decays, trainable)

    if not rules and decay is None:
        decay_settings = {"weight_decay": wd}
        no_decay_settings = {"weight_decay": 0.0}
        entries = [
            (info, DECAY_GROUP, decay_settings) if decides else (info, NO_DECAY_GROUP, no_decay_settings)
            for info, decides in zip(trainable, decisions)
        ]
        seed = [(DECAY_GROUP, decay_settings), (NO_DECAY_GROUP, no_decay_settings)]
        groups = assemble_groups(entries, seed=seed)
    else:
        base_lr = _setting(learning_rate, args, "learning_rate", DEFAULT_LEARNING_RATE)
        base_lr = float(check_number("learning_rate", base_lr, low=0.0))
        policy_label = policy if isinstance(policy, str) else getattr(policy, "__name__", "callable")
        matched = match_rules(
            rules,
            [info.name for info in trainable],
            [info.name for info in infos],
            [info.name for info in infos if info.frozen],
        )
        if decay is not None:
            by_index, num_layers = trainable_layer_ids(infos, id_fn)  # frozen blocks count too
            layers = [by_index[info.index] for info in trainable]
        else:
            layers, num_layers = [None] * len(trainable), 0
        # One (name, settings) per (rule, decision, layer), shared by identity so that grouping
        # 10^5 tensors costs a dict look-up each.
        cache: dict[tuple[int, bool, int | None], tuple[str, dict[str, Any]]] = {}
        entries = []
        for info, rule, decides, layer in zip(trainable, matched, decisions, layers):
            if rule is not None and rule.freeze:
                continue
            key = (-1 if rule is None else rule.index, decides, layer)
            decided = cache.get(key)
            if decided is None:
                decided = cache[key] = _rule_settings(
                    rule, decides, layer, wd=wd, base_lr=base_lr, decay=decay, num_layers=num_layers,
                    policy_label=policy_label,
                )
            entries.append((info, *decided))
        if not entries:
            _raise_no_trainable(model, infos, f"param_rules freeze all {len(trainable)} trainable tensors")
        groups = assemble_groups(entries)
    logger.debug(
        "param groups: %s (%d frozen tensors left out)",
        ", ".join(f"{g['name']}={len(g['params'])}" for g in groups),
        sum(1 for info in infos if info.alias_of is None and info.frozen),
    )
    return groups


def _setting(value: Any, args: Any, field: str, default: Any) -> Any:
    """The keyword when given, else ``args.<field>`` when ``args`` has it and it is set, else ``default``."""
    if value is not None:
        return value
    from_args = getattr(args, field, None) if args is not None else None
    return default if from_args is None else from_args


def _rule_settings(
    rule: ParamRule | None,
    decides: bool,
    layer: int | None,
    *,
    wd: float,
    base_lr: float,
    decay: float | None,
    num_layers: int,
    policy_label: str,
) -> tuple[str, dict[str, Any]]:
    """The group name and settings of the tensors one rule, one decay decision and one layer share."""
    policy_wd = wd if decides else 0.0
    parts: list[str] = []
    settings: dict[str, Any] = {}
    if rule is not None and rule.weight_decay is not None:
        settings["weight_decay"] = rule.weight_decay
    else:
        mult = 1.0 if rule is None or rule.wd_mult is None else rule.wd_mult
        settings["weight_decay"] = policy_wd * mult
    if rule is not None:
        parts.append(rule.name)
    if rule is None or rule.weight_decay is None:
        parts.append(DECAY_GROUP if decides else NO_DECAY_GROUP)
    if rule is not None and rule.lr is not None:
        settings["lr"] = rule.lr
    else:
        scale = None if layer is None else layer_lr_scale(layer, num_layers, decay)  # type: ignore[arg-type]
        mult = None if rule is None else rule.lr_mult
        if scale is not None or mult is not None:
            lr = base_lr
            if scale is not None:
                lr *= scale
            if mult is not None:
                lr *= mult
            settings["lr"] = lr
    if rule is not None:
        settings.update(rule.hyperparameters)
    settings["rule"] = rule.name if rule is not None else f"policy:{policy_label}"
    if layer is not None:
        settings["layer_id"] = layer
        parts.append(f"layer_{layer}")
    return "/".join(parts), settings


def _raise_no_trainable(model: nn.Module, infos: list[ParamInfo], extra: str) -> None:
    total = sum(1 for info in infos if info.alias_of is None)
    why = f"all {total} of its parameter tensors are frozen" if total else "it has no parameters"
    if extra:
        why = extra
    raise ValueError(
        f"model {type(model).__name__} has no trainable parameters ({why}); accepted: a model with "
        "at least one parameter with requires_grad=True."
    )


def freeze_parameters(model: nn.Module, args: Any = None, *, param_rules: Any = None) -> list[str]:
    """Set ``requires_grad=False`` on the parameters a ``freeze`` rule decides; return their names.

    The same first-match semantics as :func:`build_param_groups` (a tensor an earlier rule decides is
    not frozen by a later one). Idempotent: already frozen tensors are left as they are. With no
    freeze rule, the model is not touched.

    Args:
        model: the model (changed in place).
        args: an object with ``param_rules`` (optsched's ``TrainingArguments``), or ``None``.
        param_rules: overrides ``args.param_rules``.

    Raises:
        ValueError, TypeError: bad rules, or a rule that matches no parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}.")
    rules = parse_param_rules(_setting(param_rules, args, "param_rules", None))
    if not any(rule.freeze for rule in rules):
        return []
    model = unwrap_compiled(model)  # rules match the names of the model itself (build_param_groups)
    infos = classify_parameters(model)
    trainable = [info for info in infos if info.alias_of is None and not info.frozen]
    matched = match_rules(
        rules, [i.name for i in trainable], [i.name for i in infos], [i.name for i in infos if i.frozen]
    )
    frozen = []
    for info, rule in zip(trainable, matched):
        if rule is not None and rule.freeze:
            info.param.requires_grad_(False)
            frozen.append(info.name)
    if frozen:
        logger.info("param_rules froze %d parameter tensors (requires_grad=False)", len(frozen))
    return frozen


def _decide_all(policy: DecayPolicy, infos: list[ParamInfo]) -> list[bool]:
    """``policy`` applied to each record; a result that is not a bool is a TypeError naming the tensor."""
    decisions = list(map(policy, infos))
    if not set(map(type, decisions)) <= {bool}:  # one C-level pass; the loop below runs only on error
        for info, decision in zip(infos, decisions):
            if not isinstance(decision, bool):
                raise TypeError(
                    f"decay_policy must return True or False, got {type(decision).__name__} {decision!r} "
                    f"for parameter {info.name!r}."
                )
    return decisions
