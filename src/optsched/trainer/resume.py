"""What the learning rate does when a run resumes: the saved plan, the new plan, and ``lr_resume_policy``.

A checkpoint carries the *resolved plan* of its run in ``optsched_plan.json`` (:data:`PLAN_NAME`): every
param group with its name, parameter names and settings (base lr, weight decay, betas, ...; no tensors),
the schedule's spec (``{name, num_warmup_steps, num_training_steps, kwargs}``, see
:class:`optsched.schedules.ScheduleLR`) and, for a run that was itself continued, the continuation
(``{from_step, multiplier}``). On resume the plan the new arguments describe is compared with it
(:func:`compare_plans`) and ``lr_resume_policy`` decides:

* unchanged plan (every policy): the scheduler state is loaded as saved; the run continues bitwise as
  if it had never stopped (a saved continuation is rebuilt from the plan file).
* ``"replan"`` (default): the new plan applies from the resumed step ``s0``: each group's lr becomes
  ``new_plan.lr_at(s0)`` before the first step; a warning states the lr before and after.
* ``"continue"``: the lr stays continuous and the rest of the new plan is re-planned from it
  (:func:`optsched.schedules.continue_schedule`); a warning states the lr and what was re-planned.
* ``"strict"``: any difference is a ``ValueError`` listing every one of them.

Under ``replan`` and ``continue`` the group settings of the new arguments (weight decay, betas, ...)
replace the checkpoint's after the optimizer state is loaded (torch's ``load_state_dict`` would silently
bring back the old ones); a parameter frozen, added or removed since is an error under every policy.
No optimizer step is ever taken at a stale lr (transformers restores the old lr, takes one step with it,
then jumps).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optsched._validation import check_choice
from optsched.arguments import LR_RESUME_POLICIES
from optsched.schedules.continuation import Continuation, Lerp, continue_schedule  # re-exported: old home
from optsched.schedules.scheduler import applied_lrs, set_group_lr
from optsched.trainer.integrity import DEFAULT_VERIFY, CheckpointError, file_present, verify_file
from optsched.trainer.optimizer_state import membership_parts, moved_names

logger = logging.getLogger(__name__)

__all__ = [
    "LR_RESUME_POLICIES",
    "PLAN_NAME",
    "Continuation",
    "Lerp",
    "PlanDifference",
    "ResumeContext",
    "ScheduleResume",
    "compare_plans",
    "continue_schedule",
    "load_plan",
    "plan_differences",
    "prepare_resume",
    "resolve_plan",
    "restore_scheduler",
    "save_plan",
    "saved_lr_differences",
]

PLAN_NAME = "optsched_plan.json"
PLAN_FORMAT = 1
#: Param-group keys that are not settings of the plan: the tensors and their names, the lr (stored as
#: the group's base lr) and running state some optimizers keep in their groups (schedule-free's step
#: count ``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr``, ``train_mode``; a group ``step``;
#: torch-optimi's ``setup``, true once the group stepped, and ``triton``, the kernel its first step chose
#: for the machine it ran on). As settings, the last two differed from a new optimizer's (``True`` and
#: ``False`` against ``False`` and ``None``) at every resume: ``replan`` put them back after the load, and
#: the next step re-initialised the group, its step count from 0; ``strict`` refused every resume.
NON_SETTING_KEYS = frozenset(
    {"params", "param_names", "name", "lr", "initial_lr", "k", "weight_sum", "lr_max", "scheduled_lr",
     "train_mode", "step", "setup", "triton"}
)
_SKIP = object()
#: How a plan difference words a group's changed parameters (see optimizer_state.membership_parts)
_PLAN_WORDING = (
    "in the checkpoint only (frozen or removed since)",
    "new (unfrozen or added since)",
    "moved to another group since",
    "moved here from another group",
)


# ---- the resolved plan ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A JSON value for a group setting, or ``_SKIP`` (tensors with elements, callables, objects)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 and value.ndim == 0 else _SKIP
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, Mapping):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    return _SKIP


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def resolve_plan(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict[str, Any]:
    """The plan an optimizer and its scheduler carry out, as a JSON-able dict.

    ``{"format": 1, "optimizer": class name, "step": int | None, "schedule": spec | None,
    "continuation": {...} | None, "param_groups": [{"name", "param_names", "num_params", "lr", "current_lr",
    "settings"}]}``.
    A group's ``lr`` is its base lr (``initial_lr`` once a scheduler is attached), ``current_lr`` the lr
    its next step uses; ``settings`` holds every other hyperparameter that has a JSON value (tensors are
    left out, 0-d tensors become numbers), without the keys in :data:`NON_SETTING_KEYS`.
    """
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        settings = {}
        for key in sorted(group):
            if key in NON_SETTING_KEYS:
                continue
            value = _jsonable(group[key])
            if value is not _SKIP:
                settings[str(key)] = value
        groups.append(
            {
                "name": group.get("name"),
                "param_names": list(group["param_names"]) if "param_names" in group else None,
                "num_params": len(group["params"]),
                "lr": _float(group.get("initial_lr", group["lr"])),
                "current_lr": _float(group["lr"]),
                "settings": settings,
            }
        )
    spec = getattr(scheduler, "spec", None)
    schedule = getattr(scheduler, "schedule", None)
    plan = {
        "format": PLAN_FORMAT,
        "optimizer": type(optimizer).__name__,
        "step": getattr(scheduler, "last_epoch", None),
        "schedule": _jsonable(dict(spec)) if isinstance(spec, Mapping) else None,
        "continuation": schedule.record() if isinstance(schedule, Continuation) else None,
        "param_groups": groups,
    }
    if plan["schedule"] is _SKIP:
        plan["schedule"] = {"name": str(spec.get("name")), "unserializable": True}
    return json.loads(json.dumps(plan))  # exactly what a reload gives (tuples -> lists)


def save_plan(directory: str | os.PathLike, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> Path:
    """Write :func:`resolve_plan` to ``directory/optsched_plan.json``; return the path."""
    path = Path(directory) / PLAN_NAME
    text = json.dumps(resolve_plan(optimizer, scheduler), indent=2, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def load_plan(directory: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> dict[str, Any] | None:
    """The plan saved in a checkpoint, or ``None`` when it has none (a checkpoint of an older version).

    The file is checked against the checkpoint's ``checksums.json`` first
    (:func:`optsched.trainer.integrity.verify_file` at level ``verify``), like every other checkpoint
    file, so a truncated or bit-flipped plan is reported as damaged instead of being compared as if it
    were the run's plan.

    Raises:
        CheckpointError: the file's size or checksum differs from ``checksums.json``, it is missing while
            ``checksums.json`` lists it, or it is not UTF-8 JSON (a ``ValueError`` subclass; the message
            names the file).
        ValueError: the file is JSON but not a plan this version reads (unknown format).
    """
    path = Path(directory) / PLAN_NAME
    if not file_present(path):
        return None
    verify_file(path, verify)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); delete it to resume without a plan check."
        ) from None
    found = plan.get("format") if isinstance(plan, dict) else None
    if found != PLAN_FORMAT or not isinstance(plan.get("param_groups"), list):
        raise ValueError(
            f"{path} is not an optsched plan of format {PLAN_FORMAT} (format={found!r}); "
            "accepted: a file written by this version's Trainer."
        )
    return plan


# ---- comparing plans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanDifference:
    """One difference between the checkpoint's plan and the new one.

    Attributes:
        kind: ``"optimizer"`` (its class), ``"schedule"`` (spec), ``"lr"`` (a group's base lr),
            ``"setting"`` (another group hyperparameter) or ``"membership"`` (groups or their parameters).
        where: what differs, e.g. ``"schedule.num_training_steps"`` or ``"group 0 ('decay').weight_decay"``.
        old / new: the checkpoint's value and the new one.
        group / key: the group index and setting key for ``"lr"`` / ``"setting"``.
        moved: for a group's ``"membership"``, the parameters of ``old`` / ``new`` that are in another group
            on the other side (regrouped, e.g. by ``param_rules`` or ``layerwise_lr_decay``), not removed
            or added.
    """

    kind: str
    where: str
    old: Any
    new: Any
    group: int | None = None
    key: str | None = None
    moved: tuple[str, ...] = ()

    def __str__(self) -> str:
        if (self.kind == "membership" and self.group is not None and isinstance(self.old, list)
                and isinstance(self.new, list)):
            parts = membership_parts(self.old, self.new, set(self.moved), _PLAN_WORDING)
            return f"{self.where}: " + ("; ".join(parts) or "same parameters in another order")
        return f"{self.where}: {self.old!r} -> {self.new!r}"


def _group_label(i: int, group: Mapping[str, Any]) -> str:
    return f"group {i} ({group['name']!r})" if group.get("name") is not None else f"group {i}"


def _schedule_differences(old: Any, new: Any) -> list[PlanDifference]:
    if old is None or new is None:
        return [] if old == new else [PlanDifference("schedule", "schedule", old, new)]
    diffs = []
    for key in ("name", "num_warmup_steps", "num_training_steps"):
        if old.get(key) != new.get(key):
            diffs.append(PlanDifference("schedule", f"schedule.{key}", old.get(key), new.get(key)))
    old_kw, new_kw = old.get("kwargs") or {}, new.get("kwargs") or {}
    for key in sorted(set(old_kw) | set(new_kw)):
        if old_kw.get(key) != new_kw.get(key):
            where = f"schedule.kwargs.{key}"
            diffs.append(PlanDifference("schedule", where, old_kw.get(key), new_kw.get(key)))
    return diffs


def _group_differences(
    i: int, old: Mapping[str, Any], new: Mapping[str, Any], old_all: set[str], new_all: set[str]
) -> list[PlanDifference]:
    """``old_all`` / ``new_all``: every parameter name of the checkpoint's / the new groups (to tell a
    parameter moved to another group from one removed or added)."""
    label = _group_label(i, new)
    diffs = []
    if old.get("name") != new.get("name"):
        diffs.append(PlanDifference("membership", f"group {i}.name", old.get("name"), new.get("name"), i))
    old_names, new_names = old.get("param_names"), new.get("param_names")
    if old_names is not None and new_names is not None:
        if old_names != new_names:
            removed = [n for n in old_names if n not in set(new_names)]
            added = [n for n in new_names if n not in set(old_names)]
            moved = moved_names(removed, added, old_all, new_all)
            diffs.append(PlanDifference(
                "membership", f"{label} parameters", removed, added, i, moved=tuple(n for n in removed + added if n in moved)
            ))
    elif old.get("num_params") != new.get("num_params"):
        where = f"{label} number of parameters"
        diffs.append(PlanDifference("membership", where, old.get("num_params"), new.get("num_params"), i))
    if old.get("lr") != new.get("lr"):
        diffs.append(PlanDifference("lr", f"{label}.lr", old.get("lr"), new.get("lr"), i, "lr"))
    old_set, new_set = old.get("settings") or {}, new.get("settings") or {}
    for key in sorted((set(old_set) | set(new_set)) - NON_SETTING_KEYS):  # older plan files list some
        if old_set.get(key) != new_set.get(key):
            old_value, new_value = old_set.get(key), new_set.get(key)
            diffs.append(PlanDifference("setting", f"{label}.{key}", old_value, new_value, i, key))
    return diffs


def compare_plans(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[PlanDifference]:
    """Every difference between two plans (:func:`resolve_plan`): the optimizer class, the schedule, then
    group by group.

    Groups are matched by position (as torch's ``load_state_dict`` does). The ``step``, the groups'
    ``current_lr`` and a saved ``continuation`` are the run's position, not its plan: they are not
    differences. The optimizer class is compared only when both plans record it (a plan file written
    before it was recorded has none).
    """
    diffs = []
    old_cls, new_cls = saved.get("optimizer"), new.get("optimizer")
    if old_cls is not None and new_cls is not None and old_cls != new_cls:
        diffs.append(PlanDifference("optimizer", "optimizer", old_cls, new_cls))
    diffs += _schedule_differences(saved.get("schedule"), new.get("schedule"))
    old_groups, new_groups = saved.get("param_groups") or [], new.get("param_groups") or []
    if len(old_groups) != len(new_groups):
        names = lambda groups: [g.get("name") or str(i) for i, g in enumerate(groups)]  # noqa: E731
        diffs.append(PlanDifference("membership", "param_groups", names(old_groups), names(new_groups)))
    old_all = {n for g in old_groups for n in g.get("param_names") or ()}
    new_all = {n for g in new_groups for n in g.get("param_names") or ()}
    for i, (old, grp) in enumerate(zip(old_groups, new_groups)):
        diffs.extend(_group_differences(i, old, grp, old_all, new_all))
    return diffs


def plan_differences(new_state: dict[str, Any], saved_state: dict[str, Any]) -> list[str]:
    """``"field: old -> new"`` for each part of two schedulers' states that differs (``spec``, ``base_lrs``).

    Used when a checkpoint has no plan file. A scheduler without a ``spec`` (a user's own) is compared on
    ``base_lrs`` only.
    """
    diffs: list[str] = []
    new_spec, old_spec = new_state.get("spec"), saved_state.get("spec")
    if isinstance(new_spec, dict) and isinstance(old_spec, dict):
        for key in sorted(set(new_spec) | set(old_spec)):
            if new_spec.get(key) != old_spec.get(key):
                diffs.append(f"{key}: {old_spec.get(key)!r} -> {new_spec.get(key)!r}")
    new_base, old_base = new_state.get("base_lrs"), saved_state.get("base_lrs")
    if new_base is not None and old_base is not None and list(new_base) != list(old_base):
        diffs.append(f"base_lrs: {list(old_base)!r} -> {list(new_base)!r}")
    return diffs


def saved_lr_differences(scheduler: Any, saved_state: Mapping[str, Any]) -> list[str]:
    """The lrs a saved scheduler state gives its next step against the new plan's at that step.

    A checkpoint without a plan file and whose ``scheduler.pt`` has no ``spec`` (transformers' Trainer
    writes a ``LambdaLR`` state: step, base lrs and last lrs only) cannot be compared plan to plan; its
    ``_last_lr`` (the lr of the step after ``last_epoch``) is compared with ``scheduler``'s closed form at
    ``last_epoch`` instead, so a changed total, warmup, type or kwarg is seen wherever it changes the lr
    the run continues with.

    Returns:
        ``["lr at step N: [old] -> [new]"]`` when some group's lr differs (relative tolerance 1e-9), else
        ``[]``: the same lrs, a state without ``_last_lr`` / ``last_epoch``, another number of groups or a
        scheduler without a closed form (``ReduceLROnPlateau``).
    """
    saved_lrs, step = saved_state.get("_last_lr"), saved_state.get("last_epoch")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(saved_lrs, (list, tuple)):
        return []
    new_lrs = _lrs_at(scheduler, step)
    if new_lrs is None or len(new_lrs) != len(saved_lrs):
        return []
    old_lrs = [_float(lr) for lr in saved_lrs]
    if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(old_lrs, new_lrs)):
        return []
    return [f"lr at step {step}: {_fmt(old_lrs)} -> {_fmt(new_lrs)}"]


# ---- the resume ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeContext:
    """What :func:`prepare_resume` found before the optimizer state was loaded.

    Attributes:
        policy: the ``lr_resume_policy``.
        saved_plan: the checkpoint's plan (``None``: the checkpoint has no plan file).
        new_plan: the plan the new optimizer and scheduler carry.
        differences: :func:`compare_plans` of the two (empty without a saved plan).
        group_settings: the new groups' settings as objects (not JSON), re-applied after the load.
        checkpoint: the checkpoint's path, for the messages (``None``: not known).
    """

    policy: str
    saved_plan: dict[str, Any] | None
    new_plan: dict[str, Any]
    differences: list[PlanDifference]
    group_settings: list[dict[str, Any]]
    checkpoint: str | None = None


@dataclass(frozen=True)
class ScheduleResume:
    """The outcome of :func:`restore_scheduler`.

    Attributes:
        plan_changed: the new arguments describe another plan than the checkpoint's.
        step: the resumed global step.
        lr_before: each group's lr as saved in the checkpoint (the lr its next step would have used).
        lr_after: each group's lr the next optimizer step will use.
        differences: what changed, as ``"field: old -> new"`` strings.
        policy: the ``lr_resume_policy`` applied.
    """

    plan_changed: bool
    step: int
    lr_before: list[float]
    lr_after: list[float]
    differences: list[str]
    policy: str = "replan"


def _strict_error(diffs: Sequence[Any], source: str) -> ValueError:
    regrouped = any(getattr(d, "kind", None) == "membership" for d in diffs)
    return ValueError(
        f"lr_resume_policy='strict': the plan in {source} differs from the one the arguments describe "
        f"({len(diffs)} difference{'s' if len(diffs) != 1 else ''}, checkpoint -> now):\n  - "
        + "\n  - ".join(str(d) for d in diffs)
        + "\nAccepted: the checkpoint's arguments, or lr_resume_policy='replan' (the new schedule from the "
        "resumed step) or 'continue' (the lr continuous, the rest of the decay re-planned)"
        + (", once the parameter groups are as in the checkpoint: no policy resumes the optimizer state into "
           "other groups (restore the trainable parameters and param_rules / layerwise_lr_decay)."
           if regrouped else ".")
    )


def prepare_resume(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    checkpoint: str | os.PathLike,
    policy: str = "replan",
    verify: str = DEFAULT_VERIFY,
    *,
    loads_optimizer_state: bool = True,
) -> ResumeContext:
    """Read the checkpoint's plan and compare it with the new one, *before* ``optimizer.load_state_dict``.

    ``verify`` is how much the plan file is checked against ``checksums.json`` (see :func:`load_plan`).
    ``loads_optimizer_state``: the caller loads the checkpoint's optimizer state next (``False``: the
    checkpoint has none, e.g. ``save_only_model``, and the new optimizer starts fresh, so it may be another
    class).

    Raises:
        ValueError: an unknown ``policy`` (with "did you mean"); under every policy, an optimizer of another
            class than the one that saved the state to load (its state cannot be loaded into this one);
            ``policy="strict"`` and any difference (all of them listed); an unreadable plan file.
    """
    policy = check_choice("lr_resume_policy", policy, LR_RESUME_POLICIES, what="lr resume policy")
    new_plan = resolve_plan(optimizer, scheduler)
    saved_plan = load_plan(checkpoint, verify)
    diffs = compare_plans(saved_plan, new_plan) if saved_plan is not None else []
    other_class = [d for d in diffs if d.kind == "optimizer"]
    if other_class and loads_optimizer_state:
        raise ValueError(
            f"Cannot resume from {checkpoint}: its optimizer state was saved by {other_class[0].old}, but the "
            f"arguments now build {other_class[0].new} (optim changed), and one optimizer's state cannot be "
            "loaded into another; nothing was loaded into the optimizer. Accepted: the checkpoint's optim, or "
            "its weights with a fresh optimizer (load model.safetensors yourself and call train() without "
            "resume_from_checkpoint)."
        )
    if policy == "strict" and diffs:
        raise _strict_error(diffs, str(Path(checkpoint) / PLAN_NAME))
    settings = [
        {k: copy.deepcopy(v) for k, v in g.items() if k not in NON_SETTING_KEYS}
        for g in optimizer.param_groups
    ]
    return ResumeContext(policy, saved_plan, new_plan, diffs, settings, str(checkpoint))


def _lrs_at(scheduler: Any, step: int) -> list[float] | None:
    """The scheduler's closed-form lr per group at ``step``, or None when it has no closed form."""
    if callable(getattr(scheduler, "lr_at", None)):
        return [float(x) for x in scheduler.lr_at(step)]
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    return None


def _common_multiplier(lr_before: Sequence[float], base_lrs: Sequence[float]) -> float:
    """The one multiplier ``m`` with ``lr_before[i] == base_lrs[i] * m`` for every group (``continue``)."""
    pairs = [(lr, base) for lr, base in zip(lr_before, base_lrs) if base > 0]
    if not pairs:
        return 0.0
    ref = pairs[0][0] / pairs[0][1]
    if any(not math.isclose(lr / base, ref, rel_tol=1e-9, abs_tol=1e-15) for lr, base in pairs):
        ratios = ", ".join(f"{lr:.6g}/{base:.6g}={lr / base:.6g}" for lr, base in pairs)
        raise ValueError(
            "lr_resume_policy='continue' keeps every group's lr continuous with one schedule multiplier, "
            "but the checkpoint's lrs are not one multiple of the new base lrs (lr/base per group: "
            f"{ratios}): the groups' relative lrs changed. Accepted: the checkpoint's per-group lr "
            "ratios, or lr_resume_policy='replan'."
        )
    return ref


def _apply_group_settings(optimizer: torch.optim.Optimizer, context: ResumeContext) -> list[str]:
    """Put the new arguments' settings back where the loaded optimizer state brought the old ones."""
    applied = []
    for diff in context.differences:
        if diff.kind == "setting" and diff.group is not None and diff.group < len(optimizer.param_groups):
            settings = context.group_settings[diff.group]
            if diff.key in settings:
                optimizer.param_groups[diff.group][diff.key] = copy.deepcopy(settings[diff.key])
                applied.append(str(diff))
    return applied


def _move_to(scheduler: Any, optimizer: torch.optim.Optimizer, step: int, lrs: Sequence[float]) -> None:
    base_lrs = list(getattr(scheduler, "base_lrs", []))
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, lrs)):
        set_group_lr(group, lr)
        if i < len(base_lrs):
            group["initial_lr"] = base_lrs[i]  # the optimizer state restored the old plan's value
    scheduler.last_epoch = step
    scheduler._last_lr = applied_lrs(optimizer)


def _continue(scheduler: Any, step: int, multiplier: float) -> None:
    planned = getattr(scheduler, "schedule", None)
    if planned is None or not callable(getattr(scheduler, "lr_at", None)):
        raise ValueError(
            f"lr_resume_policy='continue' re-plans an optsched ScheduleLR, but the scheduler is a "
            f"{type(scheduler).__name__}; accepted: a scheduler from optsched.schedules, or "
            "lr_resume_policy='replan'."
        )
    scheduler.schedule = continue_schedule(planned, step, multiplier)


def restore_scheduler(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    saved_state: dict[str, Any] | None,
    global_step: int,
    context: ResumeContext | None = None,
) -> ScheduleResume:
    """Apply the resume policy to ``scheduler`` (and the new group settings to ``optimizer``).

    Call after ``optimizer.load_state_dict`` (which restores the checkpoint's lrs and settings into the
    groups), with the :class:`ResumeContext` from :func:`prepare_resume` (``None``: policy ``"replan"``,
    the plan compared on the scheduler state only: :func:`plan_differences`, then
    :func:`saved_lr_differences`). ``saved_state=None`` (a checkpoint saved with ``save_only_model``)
    moves the plan to ``global_step``.

    Raises:
        ValueError: ``"strict"`` and a changed schedule state (checkpoints without a plan file);
            ``"continue"`` with a scheduler that is not a ``ScheduleLR`` or groups whose relative lrs changed.
    """
    policy = context.policy if context is not None else "replan"
    saved_plan = context.saved_plan if context is not None else None
    current = [_float(g["lr"]) for g in optimizer.param_groups]
    lr_before = current
    if saved_plan is not None and len(saved_plan["param_groups"]) == len(current):
        # the plan's lrs are right even without optimizer.pt (save_only_model)
        lr_before = [float(g["current_lr"]) for g in saved_plan["param_groups"]]

    if saved_plan is not None:
        diffs = [str(d) for d in context.differences]
    elif saved_state is None:
        diffs = ["scheduler.pt: missing -> the new plan at the resumed step"]
    else:
        diffs = plan_differences(scheduler.state_dict(), saved_state) or saved_lr_differences(scheduler, saved_state)
        if diffs and policy == "strict":
            raise _strict_error(diffs, "the checkpoint's scheduler.pt (it has no plan file)")
    settings_applied = _apply_group_settings(optimizer, context) if context is not None else []

    if not diffs:  # the same plan: continue exactly as saved
        continuation = saved_plan.get("continuation") if saved_plan else None
        if continuation:
            _continue(scheduler, continuation["from_step"], continuation["multiplier"])
        if saved_state is not None:
            scheduler.load_state_dict(saved_state)
        else:
            _move_to(scheduler, optimizer, global_step, _lrs_at(scheduler, global_step) or current)
        after = [_float(g["lr"]) for g in optimizer.param_groups]
        return ScheduleResume(False, global_step, lr_before, after, [], policy)

    lrs = _lrs_at(scheduler, global_step)
    if lrs is None:
        if saved_state is None:
            logger.warning(
                "No scheduler state and no closed form for %s: it restarts at step 0.",
                type(scheduler).__name__,
            )
            return ScheduleResume(True, global_step, lr_before, current, diffs, policy)
        logger.warning(
            "The learning-rate plan changed since the checkpoint (%s) but %s has no closed form to "
            "follow the new plan from step %d; continuing with the checkpoint's schedule.",
            "; ".join(diffs),
            type(scheduler).__name__,
            global_step,
        )
        scheduler.load_state_dict(saved_state)
        after = [_float(g["lr"]) for g in optimizer.param_groups]
        return ScheduleResume(True, global_step, lr_before, after, diffs, policy)

    if policy == "continue":
        multiplier = _common_multiplier(lr_before, [float(b) for b in scheduler.base_lrs])
        _continue(scheduler, global_step, multiplier)
        lrs = _lrs_at(scheduler, global_step)
    _move_to(scheduler, optimizer, global_step, lrs)
    # which checkpoint: resume_from_checkpoint=True may have picked another run's
    where = f"{context.checkpoint} " if context is not None and context.checkpoint else ""
    if policy == "continue":
        stuck = ""
        if scheduler.schedule.multiplier == 0.0 and any(float(x) > 0 for x in scheduler.base_lrs):
            stuck = (" The checkpoint's lr is 0 (its schedule had ended), so every remaining step keeps lr 0; "
                     "to train them on the new plan, resume with lr_resume_policy='replan'.")
        logger.warning(
            "Resuming %sat step %d with a changed plan (%s), lr_resume_policy='continue': lr %s -> %s "
            "(continuous); the rest of the schedule is re-planned from multiplier %.6g to the new plan's "
            "end.%s",
            where, global_step, "; ".join(diffs), _fmt(lr_before), _fmt(lrs), scheduler.schedule.multiplier, stuck,
        )
    else:
        logger.warning(
            "Resuming %sat step %d with a changed plan (%s): lr %s -> %s. The new plan "
            "applies from this step on; no step is taken at the checkpoint's lr.",
            where, global_step, "; ".join(diffs), _fmt(lr_before), _fmt(lrs),
        )
    if settings_applied:
        logger.info(
            "Group settings of the new arguments replace the checkpoint's: %s", "; ".join(settings_applied)
        )
    return ScheduleResume(True, global_step, lr_before, list(lrs), diffs, policy)


def _fmt(lrs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in lrs) + "]"
