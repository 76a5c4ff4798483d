"""GaLore and APOLLO: low-rank projected optimizers for selected linear layers, plus layer-wise mode.

Target selection follows transformers' ``check_target_module_exists`` (reimplemented here, since
optsched never imports transformers): ``optim_target_modules`` is a regex string (full match), the
string ``"all-linear"``, or a list whose entries match a module name exactly, as a substring, or as
a full-match regex. Only ``nn.Linear`` weights are projected.

Unlike transformers, which builds ``[non-target, target]`` groups and so drops weight decay and
includes frozen parameters, the groups here are optsched's param groups (decay / no-decay, frozen
ones left out) each split into a non-target and a ``<name>_lowrank`` target part.

Layer-wise mode steps each parameter from a post-accumulate-grad hook, so only one parameter's
gradient exists at a time. transformers returns a dummy optimizer whose ``state_dict`` is empty;
:class:`LayerWiseOptimizer` saves and restores every per-parameter optimizer, and an LR scheduler
bound to it reaches the per-parameter optimizers (their lr is copied from the owning group before
each step).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerWiseOptimizer",
    "build_lowrank",
    "check_target_module_exists",
    "select_target_param_names",
    "split_groups",
]

logger = logging.getLogger(__name__)


def check_target_module_exists(
    optim_target_modules: str | list[str], key: str, return_is_regex: bool = False
) -> bool | tuple[bool, bool]:
    """Whether module name ``key`` matches ``optim_target_modules`` (transformers' rules).

    A string is a regex that must match the whole name (``is_regex`` unless it equals ``key``). For a
    list: exact name, then substring, then full-match regex (only the last counts as ``is_regex``).
    """
    found, is_regex = False, False
    if isinstance(optim_target_modules, str):
        found = re.fullmatch(optim_target_modules, key) is not None
        is_regex = optim_target_modules != key
    elif key in optim_target_modules or any(target in key for target in optim_target_modules):
        found = True
    elif any(re.fullmatch(target, key) is not None for target in optim_target_modules):
        found, is_regex = True, True
    return (found, is_regex) if return_is_regex else found


def select_target_param_names(model: nn.Module, optim_target_modules: Any, optimizer_name: str) -> list[str]:
    """Names of the ``nn.Linear`` weights selected by ``optim_target_modules``.

    Raises:
        ValueError: ``optim_target_modules`` is None, or it selects no linear layer.
        TypeError: it is neither a string nor a list of strings.
    """
    if optim_target_modules is None:
        raise ValueError(
            f"optim={optimizer_name!r} needs optim_target_modules; accepted: a list of module names, "
            "a regex string, or 'all-linear'."
        )
    if isinstance(optim_target_modules, tuple):
        optim_target_modules = list(optim_target_modules)
    if not isinstance(optim_target_modules, (list, str)) or (
        isinstance(optim_target_modules, list) and not all(isinstance(t, str) for t in optim_target_modules)
    ):
        raise TypeError(
            "optim_target_modules must be a list of strings, a regex string, or 'all-linear', got "
            f"{type(optim_target_modules).__name__} {optim_target_modules!r}."
        )
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"
    names = []
    for module_name, module in model.named_modules():
        found, is_regex = check_target_module_exists(optim_target_modules, module_name, return_is_regex=True)
        if not isinstance(module, nn.Linear):
            if found and not is_regex:
                logger.warning("%s matched but ignored: %s only supports linear layers.", module_name, optimizer_name)
            continue
        if found or all_linear:
            names.append(f"{module_name}.weight" if module_name else "weight")
    if not names:
        raise ValueError(
            f"optim_target_modules={optim_target_modules!r} selects no nn.Linear module for "
            f"optim={optimizer_name!r}; accepted: names or regexes of linear modules, or 'all-linear'."
        )
    return names


def split_groups(
    groups: Iterable[dict[str, Any]], target_names: Iterable[str], settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """Split each param group into its non-target part and a ``<name>_lowrank`` target part.

    Non-target parts come first, then target parts (transformers' order); target parts carry
    ``settings`` (rank, update_proj_gap, ...). Empty parts are dropped.
    """
    targets = set(target_names)
    plain, lowrank = [], []
    for group in groups:
        names = group["param_names"]
        for is_target, out in ((False, plain), (True, lowrank)):
            idx = [i for i, n in enumerate(names) if (n in targets) == is_target]
            if not idx:
                continue
            part = {**group, "params": [group["params"][i] for i in idx], "param_names": [names[i] for i in idx]}
            if is_target:
                part.update(settings)
                part["name"] = f"{group.get('name', 'group')}_lowrank"
            out.append(part)
    return plain + lowrank


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def build_lowrank(ctx: Any, *, group_keys: tuple[str, ...], layerwise: bool) -> tuple[Any, dict[str, Any]]:
    """Builder hook for GaLore/APOLLO names (see :class:`optsched.optim.factory.BuildContext`).

    ``group_keys`` are the kwargs that go into the target groups instead of the constructor (as in
    transformers: GaLore's rank/update_proj_gap/scale/proj_type; APOLLO's also betas and eps).
    """
    from optsched.params import build_param_groups

    name, args = ctx.spec.name, ctx.args
    if layerwise and _distributed_world_size() > 1:
        raise NotImplementedError(f"Layer-wise optim={name!r} does not support distributed training yet.")
    targets = select_target_param_names(ctx.model, getattr(args, "optim_target_modules", None), name)
    kwargs = dict(ctx.kwargs)
    settings = {k: kwargs.pop(k) for k in group_keys if k in kwargs}
    groups = split_groups(build_param_groups(ctx.model, args), targets, settings)
    if not layerwise:
        return ctx.cls, {**kwargs, "params": groups}
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    if accumulation != 1:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation!r} is not supported by layer-wise optim={name!r} "
            "(each parameter is stepped as soon as its gradient is ready); accepted: 1."
        )
    return LayerWiseOptimizer, {**kwargs, "params": groups, "optimizer_cls": ctx.cls}


class LayerWiseOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from the parameter's post-accumulate-grad hook.

    The outer object holds the real param groups (so schedulers, explain tools and resume checks
    see them) and never steps by itself: ``step()`` only evaluates a closure. Before each inner
    step the inner group's ``lr`` is set from the owning outer group, so an LR scheduler bound to
    this optimizer drives every parameter. ``state_dict()`` carries every inner state under
    ``"layerwise"`` and ``load_state_dict`` restores them (transformers' dummy saves nothing).

    Args:
        params: param groups (each may carry extra keys: weight_decay, rank, name, param_names).
        optimizer_cls: the per-parameter optimizer class.
        lr: default learning rate.
        **optimizer_kwargs: further constructor kwargs of ``optimizer_cls``.
    """

    def __init__(self, params: Any, optimizer_cls: Callable[..., torch.optim.Optimizer], lr: float = 1e-3,
                 **optimizer_kwargs: Any) -> None:
        super().__init__(params, {"lr": lr})
        self.optimizer_cls = optimizer_cls
        self.optimizers: list[torch.optim.Optimizer] = []
        self._owner: dict[int, tuple[torch.optim.Optimizer, int]] = {}
        self._handles: list[Any] = []
        for group_index, group in enumerate(self.param_groups):
            settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            names = group.get("param_names")
            for i, param in enumerate(group["params"]):
                inner_group = {**settings, "params": [param]}
                if names is not None:
                    inner_group["param_names"] = [names[i]]
                inner = optimizer_cls([inner_group], **optimizer_kwargs)
                self.optimizers.append(inner)
                self._owner[id(param)] = (inner, group_index)
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._step_param))

    def _step_param(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        inner, group_index = self._owner[id(param)]
        inner.param_groups[0]["lr"] = self.param_groups[group_index]["lr"]
        inner.step()
        inner.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Parameters were already stepped by their hooks; only evaluates ``closure`` if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["layerwise"] = [opt.state_dict() for opt in self.optimizers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        inner_states = state_dict.pop("layerwise", None)
        if not isinstance(inner_states, list) or len(inner_states) != len(self.optimizers):
            got = "none" if inner_states is None else len(inner_states)
            raise ValueError(
                f"state_dict['layerwise'] holds {got} per-parameter states; this LayerWiseOptimizer has "
                f"{len(self.optimizers)} (one per parameter): the model or groups differ."
            )
        for opt, inner_state in zip(self.optimizers, inner_states):
            opt.load_state_dict(inner_state)
        super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (after this the parameters are no longer stepped)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
