"""The torch side: :class:`ScheduleLR`, :func:`build_schedule`, :func:`get_scheduler`,
:func:`create_scheduler`.

:class:`ScheduleLR` binds a pure ``step -> multiplier`` function to any torch optimizer as a
``torch.optim.lr_scheduler.LRScheduler``: ``lr_i = base_lr_i * f(step)`` for each param group, in
closed form (no "multiply the current lr" recursion), so ``lr_at(step)`` needs no stepping and a
reloaded scheduler continues exactly.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from optsched._validation import (
    check_int,
    check_number,
    check_step_count,
    integral_to_int,
    parse_json_mapping,
)
from optsched.schedules.core import check_step
from optsched.schedules.registry import METRIC, get_schedule_info, validate_scheduler_kwargs

logger = logging.getLogger(__name__)

__all__ = [
    "ScheduleLR",
    "applied_lrs",
    "build_schedule",
    "check_state_groups",
    "create_scheduler",
    "get_scheduler",
    "is_metric_scheduler",
    "make_spec",
    "set_group_lr",
]

CUSTOM = "custom"


def set_group_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's ``lr`` as torch's own schedulers do: in place when the optimizer keeps it as a
    tensor (torchao's low-bit AdamW does; so does a torch optimizer given ``lr=torch.tensor(...)``), whose
    ``step()`` refuses a float put there; otherwise replaced."""
    current = group.get("lr")
    if isinstance(current, torch.Tensor):
        current.fill_(float(lr))
    else:
        group["lr"] = lr


def applied_lrs(optimizer: Optimizer) -> list[Any]:
    """Each group's lr as torch's schedulers record it in ``_last_lr`` (``get_last_lr()``): a tensor lr as a
    copy of the value the optimizer applies (rounded to its dtype), a number as it is."""
    return [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]


def check_state_groups(
    owner: str, state_dict: Mapping[str, Any], keys: Sequence[str], optimizer: Optimizer, why: str = ""
) -> None:
    """Refuse a scheduler state whose per-group lists (``keys``) are for another number of param groups
    than ``optimizer`` has, before anything is loaded (torch would pair them with the groups by position).

    Raises:
        ValueError: naming ``owner``'s key and both counts (``why``: a hint on what changes the groups).
    """
    groups = len(optimizer.param_groups)
    for key in keys:
        saved = state_dict.get(key)
        if saved is not None and len(saved) != groups:
            raise ValueError(
                f"the {owner} state has {key} for {len(saved)} param group(s), but the optimizer has {groups}; "
                f"accepted: a state saved with the same param groups{why}."
            )


def make_spec(
    name: str,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The schedule spec stored in ``state_dict()["spec"]``: plain, JSON-able, easy to compare.

    ``{"name": str, "num_warmup_steps": int | None, "num_training_steps": int | None, "kwargs": dict}``
    """
    return {
        "name": name,
        "num_warmup_steps": num_warmup_steps,
        "num_training_steps": num_training_steps,
        "kwargs": copy.deepcopy(dict(kwargs or {})),
    }


_SPEC_KEYS = ("name", "num_warmup_steps", "num_training_steps", "kwargs")


def _check_spec(spec: Any) -> dict[str, Any]:
    """A spec given to :class:`ScheduleLR`: a mapping with a ``name`` and only :func:`make_spec`'s keys."""
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"spec must be a dict such as {{'name': 'cosine', 'num_warmup_steps': 10, 'num_training_steps': 100}} "
            f"or None, got {type(spec).__name__} {spec!r}."
        )
    unknown = [key for key in spec if key not in _SPEC_KEYS]
    if unknown or "name" not in spec:
        raise ValueError(
            f"spec={dict(spec)!r} " + (f"has unknown key(s) {unknown!r}" if unknown else "has no 'name'")
            + f"; accepted: a dict with 'name' and optionally {', '.join(_SPEC_KEYS[1:])}."
        )
    return dict(spec)


def _check_warmup_and_total(name: str, num_warmup_steps: Any, num_training_steps: Any) -> None:
    if num_warmup_steps is not None:
        if isinstance(num_warmup_steps, float):
            raise TypeError(
                f"num_warmup_steps must be an integer number of steps, got float {num_warmup_steps!r}; "
                "for a ratio use args.get_warmup_steps(num_training_steps) or create_scheduler()."
            )
        check_int("num_warmup_steps", num_warmup_steps, low=0)
    if num_training_steps is not None:
        check_int("num_training_steps", num_training_steps, low=1)


def build_schedule(
    name: Any,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: Mapping[str, Any] | None = None,
    *,
    reference_lr: float | None = None,
) -> Callable[[int], float]:
    """The pure ``step -> multiplier`` function of a registered closed-form schedule (no optimizer).

    Args:
        name: a name, alias or ``SchedulerType``.
        num_warmup_steps: warmup length (required by every closed form except ``constant``).
        num_training_steps: total optimizer steps (required where the schedule decays to an end).
        scheduler_specific_kwargs: the schedule's kwargs (HF's ``lr_scheduler_kwargs``).
        reference_lr: the optimizer's default lr; required by schedules given an absolute lr
            (``polynomial``'s ``lr_end``, ``min_lr``), which they turn into a ratio of it.

    Raises:
        ValueError: unknown name, metric-driven schedule, missing warmup / total (HF's message:
            "linear requires `num_training_steps`, please provide that argument."), bad values.
    """
    info = get_schedule_info(name)
    if info.kind == METRIC:
        raise ValueError(
            f"{info.name!r} is metric-driven (the lr changes when the eval metric stops improving), so it "
            "has no closed-form curve; build it with get_scheduler(name, optimizer) and call "
            "scheduler.step(metric) after each evaluation."
        )
    if info.needs_warmup and num_warmup_steps is None:
        raise ValueError(f"{info.name} requires `num_warmup_steps`, please provide that argument.")
    if info.needs_total and num_training_steps is None:
        raise ValueError(f"{info.name} requires `num_training_steps`, please provide that argument.")
    _check_warmup_and_total(info.name, num_warmup_steps, num_training_steps)
    kwargs = validate_scheduler_kwargs(info.name, scheduler_specific_kwargs)
    if (
        info.needs_warmup
        and num_warmup_steps is not None
        and num_training_steps is not None
        and num_warmup_steps > num_training_steps
    ):
        # Allowed, as in HF; the user most likely mixed up steps and epochs or a ratio.
        warnings.warn(
            f"num_warmup_steps={num_warmup_steps} is longer than num_training_steps={num_training_steps}: "
            f"the {info.name!r} schedule never reaches its peak learning rate.",
            UserWarning,
            stacklevel=3,
        )
    call: dict[str, Any] = dict(kwargs)
    params = inspect.signature(info.factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in (("num_warmup_steps", num_warmup_steps), ("num_training_steps", num_training_steps)):
        if key in params or takes_any:
            call[key] = value
    if info.uses_reference_lr:
        if reference_lr is None:
            raise ValueError(
                f"{info.name!r} needs the optimizer's learning rate (reference_lr) to turn absolute lrs "
                "into ratios; pass reference_lr= or use get_scheduler(name, optimizer, ...)."
            )
        call["reference_lr"] = float(check_number("reference_lr", reference_lr, low=0.0, low_open=True))
    return info.factory(**call)


def _reference_lr(optimizer: Optimizer) -> float:
    lr = optimizer.defaults.get("lr")
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    if lr is None:
        raise ValueError(
            f"{type(optimizer).__name__} has no default lr (optimizer.defaults['lr'] is None); schedules "
            "given an absolute lr (lr_end, min_lr) need it: create the optimizer with lr=..."
        )
    return float(lr)


class ScheduleLR(LRScheduler):
    """A closed-form lr scheduler: ``lr_i(step) = base_lr_i * schedule(step)`` for every param group.

    Works with any torch optimizer and any training loop (call ``optimizer.step()`` then
    ``scheduler.step()``). Each group keeps its own base lr (its ``initial_lr``), so per-group lrs
    (layer decay, rules) keep their ratios throughout.

    Args:
        optimizer: the optimizer whose groups' ``lr`` are set.
        schedule: any ``step -> multiplier`` callable (a registered schedule from
            :func:`build_schedule`, or one composed from :mod:`optsched.schedules.core`).
        spec: what produced ``schedule`` (see :func:`make_spec`); ``get_scheduler`` fills it in. For a
            custom function without a spec the name is ``"custom"``: register the function with
            :func:`~optsched.schedules.register_schedule` to give it a comparable spec.
        last_epoch: torch's resume index; leave at -1 and use :meth:`load_state_dict` instead.

    Example:
        >>> import torch
        >>> from optsched.schedules.core import Decay, warmup_then
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=10.0)
        >>> sched = ScheduleLR(opt, warmup_then(2, Decay(8, "linear")))
        >>> sched.lr_at(3)
        [8.75]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Callable[[int], float],
        *,
        spec: Mapping[str, Any] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if not callable(schedule):
            raise TypeError(f"schedule must be callable (step -> multiplier), got {type(schedule).__name__}.")
        check_int("last_epoch", last_epoch, low=-1)
        if last_epoch >= 0 and any("initial_lr" not in group for group in optimizer.param_groups):
            raise ValueError(
                f"last_epoch={last_epoch!r} resumes a scheduler, but the optimizer's param groups have no "
                "'initial_lr'; accepted: last_epoch=-1 (then scheduler.load_state_dict(state) to resume)."
            )
        self.schedule = schedule
        self.spec = make_spec(CUSTOM) if spec is None else make_spec(**_check_spec(spec))
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_spec(cls, optimizer: Optimizer, spec: Mapping[str, Any]) -> ScheduleLR:
        """Rebuild the scheduler a spec describes (e.g. ``state_dict()["spec"]`` of a checkpoint)."""
        scheduler = get_scheduler(
            spec["name"],
            optimizer,
            num_warmup_steps=spec.get("num_warmup_steps"),
            num_training_steps=spec.get("num_training_steps"),
            scheduler_specific_kwargs=spec.get("kwargs"),
        )
        if not isinstance(scheduler, cls):
            raise ValueError(f"spec name {spec['name']!r} is metric-driven, not a closed-form schedule.")
        return scheduler

    def multiplier_at(self, step: int) -> float:
        """``schedule(step)``: the factor applied to every group's base lr at ``step``."""
        return float(self.schedule(check_step(step)))

    def lr_at(self, step: int) -> list[float]:
        """Every group's lr at ``step`` (0-based optimizer step), without stepping."""
        m = self.multiplier_at(step)
        return [float(base) * m for base in self.base_lrs]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """torch's hook: the lrs for ``self.last_epoch`` (closed form)."""
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """torch's state (step, base lrs, last lrs) plus ``spec``; the function itself is not stored.

        ``lr_lambdas`` (``None`` per group: no function state to restore) makes it a state that torch's
        ``LambdaLR.load_state_dict`` accepts, so transformers' Trainer, whose schedules are ``LambdaLR``,
        resumes an optsched checkpoint (it failed with ``KeyError: 'lr_lambdas'``); its own functions
        then continue from the saved step.
        """
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        state["spec"] = copy.deepcopy(self.spec)
        state["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved state: the step and base lrs are restored, the lrs re-applied.

        The schedule function and :attr:`spec` stay those this scheduler was built with; a saved spec
        that differs is logged (the checkpoint's spec is ``state_dict["spec"]``). The optimizer's
        group lrs are set to ``lr_at(last_epoch)`` so the next optimizer step uses the right lr even
        when the optimizer state was not reloaded.

        Raises:
            ValueError: the state has a ``base_lrs`` per param group and their number differs from
                the optimizer's groups (the model or the rules changed); nothing is loaded then.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a dict (a scheduler's state_dict(), as saved in scheduler.pt), "
                f"got {type(state_dict).__name__} {state_dict!r}."
            )
        state = dict(state_dict)
        check_state_groups(
            "scheduler", state, ("base_lrs",), self.optimizer,
            " (a changed model, param_rules or layerwise_lr_decay changes them)",
        )
        saved_spec = state.pop("spec", None)
        state.pop("schedule", None)
        state.pop("lr_lambdas", None)  # LambdaLR's (transformers' schedules), or this class's placeholder
        if saved_spec is not None and saved_spec != self.spec:
            logger.warning(
                "loading scheduler state saved with spec %s into one built with spec %s",
                saved_spec,
                self.spec,
            )
        self.__dict__.update(state)
        lrs = self.lr_at(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            set_group_lr(group, lr)
        self._last_lr = applied_lrs(self.optimizer)


def is_metric_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` wants the eval metric (ReduceLROnPlateau, GreedyLR: ours or HF's)."""
    return isinstance(scheduler, ReduceLROnPlateau) or type(scheduler).__name__ == "GreedyLR"


def get_scheduler(
    name: Any,
    optimizer: Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """HF's ``get_scheduler``: any registered schedule by name, bound to ``optimizer``.

    Closed-form names give a :class:`ScheduleLR`; ``reduce_lr_on_plateau`` a
    :class:`~optsched.schedules.plateau.PlateauLR` (a torch ``ReduceLROnPlateau``) and ``greedy`` a
    :class:`~optsched.schedules.greedy.GreedyLR`, both stepped with the metric. Every scheduler
    carries ``spec`` (also in its ``state_dict()``).

    Args:
        name: a name from :func:`list_schedulers`, an alias, or a ``SchedulerType`` (ours or HF's).
        optimizer: any ``torch.optim.Optimizer``.
        num_warmup_steps: required by every closed form but ``constant`` (HF's error otherwise).
        num_training_steps: required by the decaying ones (not ``constant*``, ``inverse_sqrt``,
            ``warmup_stable_decay`` with ``num_stable_steps``).
        scheduler_specific_kwargs: the schedule's own kwargs; unknown ones are a ``ValueError``
            listing the accepted ones (HF raises a ``TypeError`` from deep inside).
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    info = get_schedule_info(name)
    kwargs = validate_scheduler_kwargs(info.name, scheduler_specific_kwargs)
    # HF's recipe for the total is a float (epochs are floats): 24.0 means 24 steps.
    num_training_steps = integral_to_int(num_training_steps)
    if not (isinstance(num_warmup_steps, float) and num_warmup_steps < 1):  # a ratio stays an error
        num_warmup_steps = integral_to_int(num_warmup_steps)
    spec = make_spec(info.name, num_warmup_steps, num_training_steps, kwargs)
    if info.kind == METRIC:
        scheduler = info.factory(optimizer, **kwargs)
        scheduler.spec = spec  # kept in its state_dict() (PlateauLR, GreedyLR)
        return scheduler
    reference_lr = _reference_lr(optimizer) if info.uses_reference_lr else None
    schedule = build_schedule(
        info.name, num_warmup_steps, num_training_steps, kwargs, reference_lr=reference_lr
    )
    return ScheduleLR(optimizer, schedule, spec=spec)


def create_scheduler(optimizer: Optimizer, args: Any, num_training_steps: int) -> Any:
    """HF's ``Trainer.create_scheduler`` as a function: the schedule the arguments describe.

    Reads ``args.lr_scheduler_type``, ``args.get_warmup_steps(num_training_steps)`` (an int ``>= 1``
    is a step count, a float in (0, 1) a ratio of the total, rounded up) and
    ``args.lr_scheduler_kwargs``. ``args`` is optsched's ``TrainingArguments``, transformers' (read by
    attribute), or ``None`` for the defaults.
    """
    num_training_steps = check_step_count("num_training_steps", num_training_steps, low=1)
    args = _as_training_arguments(args)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.get_warmup_steps(num_training_steps)),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=parse_json_mapping("lr_scheduler_kwargs", args.lr_scheduler_kwargs),
    )


def _as_training_arguments(args: Any) -> Any:
    from optsched.arguments import as_training_arguments  # lazy: arguments imports this package

    return as_training_arguments(args)
