"""Resolve ``TrainingArguments`` into an optimizer class and kwargs, and build the optimizer.

``get_optimizer_cls_and_kwargs(args, model)`` keeps transformers' contract (same class and keyword
arguments as ``Trainer.get_optimizer_cls_and_kwargs`` for every transformers name) but has no side
effects: transformers registers the layer-wise hooks while *resolving*; here they are registered
when the optimizer is *built*. ``create_optimizer(model, args)`` mirrors ``Trainer.create_optimizer``.

Resolution of one name, in order:

1. the spec (``ValueError`` with the closest names for an unknown one);
2. the default ``adamw_torch_fused`` becomes ``adamw_torch`` when the parameters' device has no
   fused kernel and the user did not ask for fused explicitly (explicitly: a ``ValueError``);
3. the class is imported (``ImportError`` naming ``pip install 'optsched[extra]'``);
4. kwargs = common arguments (``lr``, ``betas``, ``eps``, ...) + fixed kwargs + ``optim_args``
   (typed; defaults from the spec);
5. the spec's builder, if any, reshapes them (GaLore groups, LOMO's model, schedule-free warmup).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optsched._validation import check_int, did_you_mean
from optsched.optim.bnb import keep_embeddings_32bit
from optsched.optim.optim_args import parse_optim_args
from optsched.optim.spec import OptimizerSpec, _explicit, get_optimizer_spec

__all__ = [
    "BuildContext",
    "accepted_group_keys",
    "check_param_rules_fit",
    "create_optimizer",
    "fused_supported",
    "get_optimizer_cls_and_kwargs",
    "is_optimizer_factory",
    "resolve_optimizer_name",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildContext:
    """What a spec's builder hook receives.

    Attributes:
        spec: the optimizer's spec.
        cls: the imported class (or factory).
        args: optsched ``TrainingArguments``.
        model: the model, or ``None`` when resolving without one.
        kwargs: common + fixed + ``optim_args`` keyword arguments (a fresh dict the builder may edit).
        optim_args: the user's parsed ``optim_args`` (only the keys given).
        num_training_steps: total optimizer steps when known (schedule-free warmup ratios need it).
    """

    spec: OptimizerSpec
    cls: Any
    args: Any
    model: nn.Module | None
    kwargs: dict[str, Any]
    optim_args: dict[str, Any]
    num_training_steps: int | None = None


def is_optimizer_factory(optimizer_cls_or_factory: Any) -> bool:
    """True unless it is a ``torch.optim.Optimizer`` subclass (transformers' rule).

    A factory is called as ``factory()(model, **kwargs)`` by :func:`create_optimizer`.
    """
    return not (
        isinstance(optimizer_cls_or_factory, type)
        and issubclass(optimizer_cls_or_factory, torch.optim.Optimizer)
    )


def _fused_devices() -> set[str]:
    try:  # torch keeps the list private; it moves between releases
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older/newer torch
        logger.debug("torch has no _get_fused_kernels_supported_devices; assuming cuda, cpu, mps, xpu")
        return {"cuda", "cpu", "mps", "xpu"}
    return set(_get_fused_kernels_supported_devices())


def fused_supported(model: nn.Module | None) -> bool:
    """Whether torch's fused AdamW kernel can step every trainable parameter of ``model``.

    Fused needs floating-point tensors on a device with the kernel (cuda, cpu, mps, xpu, hpu in
    torch 2.13). With no model there is nothing to check: ``True``.
    """
    if model is None:
        return True
    devices = _fused_devices()
    return all(
        p.device.type in devices and torch.is_floating_point(p) for p in model.parameters() if p.requires_grad
    )


# name -> (name to use instead, test that the name works). Only applied when the user did not
# choose the name explicitly (it is the default), so an explicit choice is never silently changed.
_DEFAULT_FALLBACKS = {"adamw_torch_fused": ("adamw_torch", fused_supported)}


def resolve_optimizer_name(args: Any, model: nn.Module | None = None) -> str:
    """The registered name ``args.optim`` stands for, after the default-fused fallback.

    Raises:
        ValueError: unknown name, or an explicit ``adamw_torch_fused`` the model's device cannot run.
    """
    name = get_optimizer_spec(args.optim).name
    fallback = _DEFAULT_FALLBACKS.get(name)
    if fallback is not None and not fallback[1](model):
        if _explicit(args, "optim"):
            devices = sorted({p.device.type for p in model.parameters()}) if model is not None else []
            raise ValueError(
                f"optim={name!r} needs torch's fused kernel, which is not available for parameters on "
                f"{devices} (or non-floating-point parameters); accepted: optim='{fallback[0]}' here."
            )
        logger.info("optim=%r is not supported for this model's device; using %r", name, fallback[0])
        name = fallback[0]
    return name


def _as_args(args: Any) -> Any:
    from optsched.arguments import as_training_arguments

    return as_training_arguments(args)


def get_optimizer_cls_and_kwargs(
    args: Any, model: nn.Module | None = None, *, num_training_steps: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The optimizer class (or factory) and keyword arguments ``args`` ask for.

    Same contract and, for every transformers name, the same class and kwargs as transformers'
    ``Trainer.get_optimizer_cls_and_kwargs`` (differences are fixes: typed ``optim_args``, SGD
    momentum from an explicit ``adam_beta1``, schedule-free warmup in steps, GaLore/APOLLO groups
    that keep weight decay, a layer-wise optimizer whose state saves and loads).

    Args:
        args: optsched's or transformers' ``TrainingArguments`` (or ``None`` for defaults).
        model: the model; needed by GaLore/APOLLO (target modules) and LOMO.
        num_training_steps: total optimizer steps, needed only to turn a schedule-free warmup
            ratio (``0 < warmup_steps < 1``) into steps.

    Returns:
        ``(cls_or_factory, kwargs)``. kwargs may hold ``params`` (GaLore/APOLLO groups) or
        ``model`` (LOMO), which :func:`create_optimizer` passes in place of the param groups.

    Raises:
        ValueError: unknown name, bad ``optim_args``, missing model or target modules.
        ImportError: the optimizer's package is not installed.
    """
    args = _as_args(args)
    check_int("num_training_steps", num_training_steps, low=1, allow_none=True)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__} {model!r:.80}.")
    name = resolve_optimizer_name(args, model)
    spec = get_optimizer_spec(name)
    if spec.needs_model and model is None:
        raise ValueError(f"optim={name!r} needs the model: pass model= to get_optimizer_cls_and_kwargs.")
    user = parse_optim_args(name, getattr(args, "optim_args", None))  # before the import: cheap errors first
    cls = spec.load_class()

    kwargs = spec.resolve_kwargs(args, user)

    if spec.builder is not None:
        ctx = BuildContext(spec, cls, args, model, kwargs, user, num_training_steps)
        cls, kwargs = spec.builder(ctx)
    return cls, kwargs


def _check_device(spec: OptimizerSpec, model: nn.Module) -> None:
    if spec.requires_device is None:
        return
    devices = {p.device.type for p in model.parameters()}
    if devices != {spec.requires_device}:
        raise ValueError(
            f"optim={spec.name!r} runs only on {spec.requires_device} tensors; the model's parameters "
            f"are on {sorted(devices)}. Accepted: move the model to {spec.requires_device} or choose "
            "another optimizer."
        )


# Group keys an optimizer reads that its constructor does not take (checked by class path).
_GROUP_ONLY_KEYS: dict[str, frozenset[str]] = {
    "optsched.optim.muon.MuonWithAdamW": frozenset({"use_muon"}),
}


def accepted_group_keys(optimizer_cls: Any) -> frozenset[str] | None:
    """The hyperparameters a param group of ``optimizer_cls`` may set, or ``None`` when any is accepted.

    They are the keyword parameters of its constructor (``torch.optim`` fills each group's missing
    keys from them), plus :data:`_GROUP_ONLY_KEYS`; a constructor taking ``**kwargs`` accepts any key.
    """
    try:
        signature = inspect.signature(optimizer_cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover - a C extension without a signature
        return None
    keys = set()
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if name not in ("self", "params") and parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            keys.add(name)
    path = f"{getattr(optimizer_cls, '__module__', '')}.{getattr(optimizer_cls, '__qualname__', '')}"
    return frozenset(keys | _GROUP_ONLY_KEYS.get(path, frozenset()))


def check_param_rules_fit(optimizer_cls: Any, kwargs: dict[str, Any], args: Any) -> None:
    """Refuse ``param_rules`` / ``layerwise_lr_decay`` that the optimizer would silently ignore.

    * an optimizer built from the model rather than from param groups (LOMO, a factory): ``ValueError``;
    * a rule hyperparameter the optimizer's groups do not take (``momentum`` for AdamW): ``ValueError``
      naming the rule, the key, the optimizer and the accepted keys (with "did you mean").
    """
    from optsched.params import parse_param_rules

    rules = parse_param_rules(getattr(args, "param_rules", None))
    if not rules and getattr(args, "layerwise_lr_decay", None) is None:
        return
    optim = getattr(args, "optim", None)
    cls_name = getattr(optimizer_cls, "__qualname__", repr(optimizer_cls))
    if is_optimizer_factory(optimizer_cls) or "model" in kwargs:
        raise ValueError(
            f"optim={optim!r} ({cls_name}) is built from the model, not from param groups, so "
            "param_rules and layerwise_lr_decay cannot apply to it; accepted: leave them unset, or an "
            "optimizer that takes param groups."
        )
    accepted = accepted_group_keys(optimizer_cls)
    if accepted is None:
        return
    for rule in rules:
        for key, _ in rule.hyperparameters:
            if key not in accepted:
                raise ValueError(
                    f"{rule.label} sets {key!r}, which optim={optim!r} ({cls_name}) does not take."
                    f"{did_you_mean(key, accepted)} Accepted hyperparameters: "
                    f"{', '.join(sorted(accepted))} (and lr, lr_mult, weight_decay, wd_mult, freeze)."
                )


def create_optimizer(
    model: nn.Module,
    args: Any = None,
    optimizer_cls_and_kwargs: tuple[Any, dict[str, Any]] | None = None,
    *,
    num_training_steps: int | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer for ``model`` as transformers' ``Trainer.create_optimizer`` does.

    Param groups come from :func:`optsched.params.build_param_groups` (HF's decay / no-decay
    groups, frozen parameters left out, tied parameters once); each keeps its ``name`` and
    ``param_names`` in ``optimizer.param_groups``. ``args.param_rules``, ``args.decay_policy``,
    ``args.layerwise_lr_decay`` and ``args.layer_id_fn`` shape them (docs/param_groups.md); the
    parameters a ``freeze`` rule matches get ``requires_grad=False`` here (the model is changed),
    and a rule hyperparameter the optimizer does not take is a ``ValueError``. A ``torch.compile``'d
    model is optimized as the module it wraps (the same tensors; names without ``_orig_mod.``), so it
    gets the groups and the optimizer state of the uncompiled model.

    Args:
        model: the model to optimize.
        args: optsched's or transformers' ``TrainingArguments`` (``None``: defaults).
        optimizer_cls_and_kwargs: ``(cls, kwargs)`` used instead of the name lookup. A ``cls`` that
            is not a ``torch.optim.Optimizer`` subclass is a factory: ``cls()(model, **kwargs)``.
        num_training_steps: see :func:`get_optimizer_cls_and_kwargs` (schedule-free warmup ratio).

    Returns:
        The optimizer. Schedule-free optimizers must be switched with ``optimizer.train()`` before
        stepping and ``optimizer.eval()`` before evaluating or saving (optsched's Trainer does it).

    Raises:
        ValueError, ImportError: see :func:`get_optimizer_cls_and_kwargs`; also an optimizer that
            needs a device the model is not on (``adalomo`` needs CUDA).
    """
    from optsched.params import build_param_groups, freeze_parameters, unwrap_compiled

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_compiled(model)  # torch.compile'd: the same tensors, grouped by their own names
    args = _as_args(args)
    freeze_parameters(model, args)  # param_rules' freeze=True: requires_grad=False, before any grouping
    if optimizer_cls_and_kwargs is not None:
        if not (isinstance(optimizer_cls_and_kwargs, (tuple, list)) and len(optimizer_cls_and_kwargs) == 2):
            raise TypeError(
                "optimizer_cls_and_kwargs must be a (cls, kwargs) pair, got "
                f"{type(optimizer_cls_and_kwargs).__name__} {optimizer_cls_and_kwargs!r}."
            )
        optimizer_cls, optimizer_kwargs = optimizer_cls_and_kwargs
        if not callable(optimizer_cls):
            hint = f"; for a registered name use optim={optimizer_cls!r}" if isinstance(optimizer_cls, str) else ""
            raise TypeError(
                f"optimizer_cls_and_kwargs[0] must be an optimizer class or factory, got "
                f"{type(optimizer_cls).__name__} {optimizer_cls!r}{hint}."
            )
        if not isinstance(optimizer_kwargs, Mapping):
            raise TypeError(
                f"optimizer_cls_and_kwargs[1] must be a dict of keyword arguments, got "
                f"{type(optimizer_kwargs).__name__} {optimizer_kwargs!r}."
            )
        name = None
    else:
        name = resolve_optimizer_name(args, model)
        _check_device(get_optimizer_spec(name), model)
        optimizer_cls, optimizer_kwargs = get_optimizer_cls_and_kwargs(
            args, model, num_training_steps=num_training_steps
        )
    kwargs = dict(optimizer_kwargs)  # never mutate the caller's dict (HF pops from it)
    check_param_rules_fit(optimizer_cls, kwargs, args)

    if is_optimizer_factory(optimizer_cls):
        build, first = optimizer_cls(), model
    else:
        params: Any = build_param_groups(model, args)
        # Resolution may replace the groups: GaLore/APOLLO split them (params), LOMO takes the model.
        if "params" in kwargs:
            params = kwargs.pop("params")
        if "model" in kwargs:
            params = kwargs.pop("model")
        build, first = optimizer_cls, params
    try:
        optimizer = build(first, **kwargs)
    except ValueError as exc:
        if name is None:  # the caller's own class and kwargs: its message is about what they passed
            raise
        # The class's own check ("Nesterov momentum requires a momentum..."), about values that came
        # from TrainingArguments and optim_args: say which.
        shown = {k: v for k, v in kwargs.items() if k not in ("params", "model")}
        raise ValueError(
            f"optim={name!r} ({getattr(optimizer_cls, '__qualname__', optimizer_cls)}) refused the arguments "
            f"{shown} (from TrainingArguments, optim_args={getattr(args, 'optim_args', None)!r}): {exc}"
        ) from exc

    keep_embeddings_32bit(optimizer, optimizer_cls, optimizer_kwargs, model)
    if name is not None:
        # The name it was built from: several names build the same class ("adamw", "adamw_torch"), and
        # explain / plan / the memory estimate show the one the user chose.
        optimizer._optsched_name = name
    return optimizer
