"""``optsched.explain``: what an optimizer and scheduler will do, as a report, before you train.

The report has three parts:

* **groups**: per param group the number of tensors and elements, the base lr (``initial_lr`` once
  a scheduler is attached) and the current lr, the weight decay, what decided the group (its
  ``name``, and its ``rule`` when a parameter rule made it) and a few parameter names. With the model,
  also the trainable tensors in no group and the frozen ones (a classic silent bug).
* **schedule**: type, warmup, total, and each group's lr at the key steps (0, end of warmup,
  middle, last step ``T-1``) and the final lr (after ``T`` scheduler steps). A
  :class:`~optsched.schedules.ScheduleLR` is evaluated in closed form; any other torch scheduler is
  stepped on a deep copy that shares the parameters (nothing is allocated, the original is not
  touched); metric-driven schedulers are reported as such.
* **memory**: the optimizer-state bytes from the optimizer's formula
  (:mod:`optsched.memory`) and, once it has stepped, the bytes actually held.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optsched._validation import check_int
from optsched.memory import MemoryEstimate, estimate_from_optimizer, measure_optimizer_state

__all__ = ["ExplainReport", "GroupReport", "ScheduleReport", "explain", "sample_lrs"]

logger = logging.getLogger(__name__)

#: how many steps a non-closed-form scheduler is stepped on a copy, at most
MAX_SAMPLED_STEPS = 100_000
#: parameter names shown per group
SAMPLE_NAMES = 3


@dataclass
class GroupReport:
    """One param group.

    Attributes:
        index: position in ``optimizer.param_groups``.
        name: the group's ``name`` (``"group i"`` when it has none).
        rule: the ``rule`` key (set by parameter rules), or ``None``.
        num_tensors, num_elements: what the group holds.
        base_lr: ``initial_lr`` (set by a scheduler) or else ``lr``.
        lr: the current ``lr``.
        weight_decay: the group's weight decay (``None`` when the optimizer has none).
        sample_names: the first parameter names (from ``param_names``).
        settings: other scalar settings that differ between groups (``use_muon``, ``betas``, ...).
    """

    index: int
    name: str
    rule: str | None
    num_tensors: int
    num_elements: int
    base_lr: float | None
    lr: float | None
    weight_decay: float | None
    sample_names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "rule": self.rule,
            "num_tensors": self.num_tensors,
            "num_elements": self.num_elements,
            "base_lr": self.base_lr,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "sample_names": list(self.sample_names),
            "settings": {k: _plain(v) for k, v in self.settings.items()},
        }


@dataclass
class ScheduleReport:
    """The lr schedule.

    Attributes:
        type: the schedule's name (``spec["name"]``), the scheduler's class name, or ``"none"``.
        num_warmup_steps, num_training_steps: as known (``None`` when not).
        kwargs: the schedule's kwargs.
        method: ``"closed form"``, ``"sampled"`` (stepped on a copy), ``"constant"`` (no scheduler)
            or ``"unknown"``.
        key_steps: ``[(label, step, [lr per group])]``.
        final_lrs: each group's lr after the last step (``None`` when unknown).
        note: why something is unknown.
    """

    type: str
    num_warmup_steps: int | None
    num_training_steps: int | None
    kwargs: dict[str, Any]
    method: str
    key_steps: list[tuple[str, int, list[float]]]
    final_lrs: list[float] | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "num_warmup_steps": self.num_warmup_steps,
            "num_training_steps": self.num_training_steps,
            "kwargs": {k: _plain(v) for k, v in self.kwargs.items()},
            "method": self.method,
            "key_steps": [{"label": label, "step": step, "lrs": list(lrs)} for label, step, lrs in self.key_steps],
            "final_lrs": None if self.final_lrs is None else list(self.final_lrs),
            "note": self.note,
        }


@dataclass
class ExplainReport:
    """What :func:`explain` found; ``str(report)`` renders it as tables, ``to_dict()`` as plain data."""

    optimizer: str
    optimizer_name: str | None
    groups: list[GroupReport]
    schedule: ScheduleReport
    memory_estimate: MemoryEstimate | None
    memory_actual: MemoryEstimate | None
    model: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "optimizer": self.optimizer,
            "optimizer_name": self.optimizer_name,
            "groups": [g.to_dict() for g in self.groups],
            "schedule": self.schedule.to_dict(),
            "memory_estimate": None if self.memory_estimate is None else self.memory_estimate.to_dict(),
            "memory_actual": None if self.memory_actual is None else self.memory_actual.to_dict(),
            "model": None if self.model is None else dict(self.model),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return render_report(self)


# --------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------

_KNOWN_KEYS = {"params", "param_names", "name", "rule", "lr", "initial_lr", "weight_decay"}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):  # torchao keeps lr as a tensor
        return float(value.item())
    return None if value is None else float(value)


def _varying_settings(groups: Sequence[Mapping[str, Any]]) -> set[str]:
    """Scalar keys whose value is not the same in every group (worth a column)."""
    keys: set[str] = set()
    for g in groups:
        keys |= {k for k, v in g.items() if k not in _KNOWN_KEYS and isinstance(v, (int, float, bool, str, tuple))}
    return {k for k in keys if len({repr(g.get(k)) for g in groups}) > 1}


def describe_groups(optimizer: torch.optim.Optimizer) -> list[GroupReport]:
    """One :class:`GroupReport` per param group of any torch optimizer."""
    varying = _varying_settings(optimizer.param_groups)
    reports = []
    for index, group in enumerate(optimizer.param_groups):
        params = group["params"]
        names = list(group.get("param_names") or [])
        reports.append(
            GroupReport(
                index=index,
                name=str(group.get("name") or f"group {index}"),
                rule=None if group.get("rule") is None else str(group["rule"]),
                num_tensors=len(params),
                num_elements=sum(p.numel() for p in params),
                base_lr=_float(group.get("initial_lr", group.get("lr"))),
                lr=_float(group.get("lr")),
                weight_decay=_float(group.get("weight_decay")),
                sample_names=names[:SAMPLE_NAMES],
                settings={k: group.get(k) for k in sorted(varying)},
            )
        )
    return reports


def describe_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[str]]:
    """Totals of the model, and notes on trainable tensors no group optimizes."""
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    seen: set[int] = set()
    trainable = frozen = trainable_elements = 0
    missing: list[str] = []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += 1
            trainable_elements += p.numel()
            if id(p) not in in_groups:
                missing.append(name)
        else:
            frozen += 1
    notes = []
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        notes.append(f"{len(missing)} trainable tensor(s) are in no param group and will not be trained: {shown}")
    info = {
        "class": type(model).__name__,
        "trainable_tensors": trainable,
        "trainable_elements": trainable_elements,
        "frozen_tensors": frozen,
        "not_optimized": missing,
    }
    return info, notes


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------


def key_steps(num_training_steps: int, num_warmup_steps: int | None) -> list[tuple[str, int]]:
    """``[(label, step)]``: start, end of warmup, middle, last (``T - 1``), without duplicates."""
    from optsched.schedules.render import key_points

    return key_points(num_training_steps, int(num_warmup_steps or 0))


#: transformers' lr-lambda functions -> the ``lr_scheduler_type`` that binds them
_HF_LAMBDA_TYPES = {
    "_get_linear_schedule_with_warmup_lr_lambda": "linear",
    "_get_cosine_schedule_with_warmup_lr_lambda": "cosine",  # cosine_with_min_lr when it binds min_lr_rate
    "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda": "cosine_with_restarts",
    "_get_polynomial_decay_schedule_with_warmup_lr_lambda": "polynomial",
    "_get_constant_schedule_with_warmup_lr_lambda": "constant_with_warmup",
    "_get_inverse_sqrt_schedule_lr_lambda": "inverse_sqrt",
    "_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda": "cosine_warmup_with_min_lr",
    "_get_wsd_scheduler_lambda": "warmup_stable_decay",
}


def _hf_partial(scheduler: Any) -> dict[str, Any] | None:
    """transformers' ``LambdaLR`` schedules bind warmup and total into a ``functools.partial``; the name
    is the ``lr_scheduler_type`` that builds it (the function's name, shortened, for another partial)."""
    import functools

    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or not isinstance(lambdas[0], functools.partial):
        return None
    fn = lambdas[0]
    func_name = getattr(fn.func, "__name__", "lambda")
    name = _HF_LAMBDA_TYPES.get(func_name)
    if name is None:
        name = func_name.removeprefix("_get_").removesuffix("_lr_lambda")
        name = name.removesuffix("_schedule_with_warmup").removesuffix("_with_warmup").removeprefix("get_")
    elif name == "cosine" and "min_lr_rate" in fn.keywords:
        name = "cosine_with_min_lr"
    out = {"name": name, **fn.keywords}
    if name == "warmup_stable_decay" and "num_training_steps" not in out:
        # transformers binds the three phases, not the total: the run is their sum
        phases = [out.get(k) for k in ("num_warmup_steps", "num_stable_steps", "num_decay_steps")]
        if all(isinstance(v, int) for v in phases):
            out["num_training_steps"] = sum(phases)
    return out


def sample_lrs(optimizer: torch.optim.Optimizer, scheduler: Any, steps: Sequence[int]) -> dict[int, list[float]]:
    """Each group's lr at the given steps, by stepping a deep copy of ``scheduler``.

    The copy shares the parameters and none of the optimizer's state (so nothing large is copied);
    the original optimizer and scheduler are not touched.

    Raises:
        ValueError: a step above :data:`MAX_SAMPLED_STEPS`, or before the scheduler's current step.
    """
    wanted = sorted(set(int(s) for s in steps))
    if not wanted:
        return {}
    if wanted[-1] > MAX_SAMPLED_STEPS:
        raise ValueError(
            f"step={wanted[-1]} is too far to sample by stepping a copy of {type(scheduler).__name__}; accepted: "
            f"at most {MAX_SAMPLED_STEPS} (use a closed-form optsched ScheduleLR to evaluate any step)."
        )
    memo: dict[int, Any] = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    memo[id(optimizer.state)] = type(optimizer.state)(dict) if hasattr(optimizer.state, "default_factory") else {}
    clone = copy.deepcopy(scheduler, memo)
    out: dict[int, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        current = max(0, int(getattr(clone, "last_epoch", 0)))
        if wanted[0] < current:
            raise ValueError(
                f"the scheduler is at step {current} already, so step {wanted[0]} cannot be sampled by stepping a "
                "copy; accepted: explain() a scheduler before training, or use a closed-form ScheduleLR."
            )
        for step in wanted:
            while current < step:
                clone.step()
                current += 1
            lrs = [_float(g["lr"]) for g in clone.optimizer.param_groups]
            out[step] = lrs
    return out


def describe_schedule(
    optimizer: torch.optim.Optimizer, scheduler: Any, num_training_steps: int | None = None
) -> ScheduleReport:
    """The :class:`ScheduleReport` of any scheduler (see the module docstring)."""
    from optsched.schedules import ScheduleLR, is_metric_scheduler

    if scheduler is None:
        lrs = [_float(g["lr"]) for g in optimizer.param_groups]
        return ScheduleReport("none", None, num_training_steps, {}, "constant", [("all steps", 0, lrs)], lrs,
                              "no scheduler: each group keeps its lr")
    spec = getattr(scheduler, "spec", None)
    hf = _hf_partial(scheduler)
    source = spec if isinstance(spec, Mapping) else (hf or {})
    kind = str(source.get("name") or type(scheduler).__name__)
    warmup = source.get("num_warmup_steps")
    total = num_training_steps if num_training_steps is not None else source.get("num_training_steps")
    kwargs = dict(source.get("kwargs") or {k: v for k, v in (hf or {}).items()
                                           if k not in ("name", "num_warmup_steps", "num_training_steps")})
    if is_metric_scheduler(scheduler):
        return ScheduleReport(kind, warmup, total, kwargs, "unknown", [], None,
                              "metric-driven: the lr changes when the eval metric stops improving")
    if total is None:
        return ScheduleReport(kind, warmup, None, kwargs, "unknown", [], None,
                              "the number of training steps is unknown: pass num_training_steps= to explain()")
    points = key_steps(total, warmup)
    if isinstance(scheduler, ScheduleLR):
        method = "closed form"
        at = {step: scheduler.lr_at(step) for _, step in points}
        at[total] = scheduler.lr_at(total)
    else:
        method = "sampled"
        try:
            at = sample_lrs(optimizer, scheduler, [s for _, s in points] + [total])
        except (ValueError, TypeError, RuntimeError) as exc:  # an uncopyable scheduler: say so
            return ScheduleReport(kind, warmup, total, kwargs, "unknown", [], None, f"could not sample: {exc}")
    return ScheduleReport(
        kind, warmup, total, kwargs, method, [(label, step, at[step]) for label, step in points], at[total]
    )


# --------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------


def explain(
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    model: nn.Module | None = None,
    *,
    num_training_steps: int | None = None,
) -> ExplainReport:
    """Explain the param groups, the lr schedule and the optimizer-state memory of a setup.

    Works with any torch optimizer (groups without ``name`` are shown as ``"group i"``) and any
    scheduler: optsched's :class:`~optsched.schedules.ScheduleLR` in closed form, transformers'
    ``LambdaLR`` schedules and other torch schedulers by stepping a copy, metric-driven ones as such.

    Args:
        optimizer: the optimizer.
        scheduler: its lr scheduler, or ``None`` (constant lr).
        model: the model; adds totals, the trainable tensors in no group, and lets the memory estimate
            recognise embeddings (bitsandbytes keeps their state in fp32).
        num_training_steps: the schedule's horizon when the scheduler does not know it (``constant``,
            a torch scheduler) or to look at another one.

    Returns:
        An :class:`ExplainReport`: ``print(report)`` for tables, ``report.to_dict()`` for data.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer, ``model`` not a module.
        ValueError: ``num_training_steps`` < 1.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_int("num_training_steps", num_training_steps, low=1, allow_none=True)
    notes: list[str] = []
    model_info = None
    if model is not None:
        from optsched.params import unwrap_compiled

        model = unwrap_compiled(model)  # named as its param groups are (no "_orig_mod." prefix)
        model_info, model_notes = describe_model(model, optimizer)
        notes.extend(model_notes)
    estimate = estimate_from_optimizer(optimizer, model)
    if estimate is None:
        notes.append(f"no memory formula for {type(optimizer).__name__}: register one with "
                     "optsched.memory.register_state_formula")
    actual = measure_optimizer_state(optimizer)
    return ExplainReport(
        optimizer=type(optimizer).__name__,
        optimizer_name=None if estimate is None else estimate.optim,
        groups=describe_groups(optimizer),
        schedule=describe_schedule(optimizer, scheduler, num_training_steps),
        memory_estimate=estimate,
        memory_actual=actual if actual.num_tensors else None,
        model=model_info,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return text in ("", "-")
    return True


def _sample_cell(group: GroupReport, width: int = 72) -> str:
    """The first names, shortened to ``width`` characters; ``-`` when the group has no names."""
    if not group.sample_names:
        return "-"
    text = ", ".join(group.sample_names) + (", ..." if group.num_tensors > len(group.sample_names) else "")
    return text if len(text) <= width else text[: width - 3] + "..."


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def render_report(report: ExplainReport) -> str:
    """The report as text tables (what ``str(report)`` returns)."""
    title = report.optimizer + (f" (optim={report.optimizer_name!r})" if report.optimizer_name else "")
    out = [f"Optimizer: {title}"]
    if report.model is not None:
        m = report.model
        out.append(
            f"Model: {m['class']}, {m['trainable_elements']:,} trainable elements in {m['trainable_tensors']} "
            f"tensors, {m['frozen_tensors']} frozen tensors"
        )
    has_rule = any(g.rule for g in report.groups)
    setting_keys = sorted({k for g in report.groups for k in g.settings})
    headers = ["#", "group"] + (["rule"] if has_rule else []) + ["tensors", "elements", "base lr", "weight decay"]
    headers += setting_keys + ["sample parameters"]
    rows = []
    for g in report.groups:
        row: list[Any] = [g.index, g.name] + ([g.rule or "-"] if has_rule else [])
        row += [g.num_tensors, f"{g.num_elements:,}", _lr(g.base_lr),
                "-" if g.weight_decay is None else f"{g.weight_decay:g}"]
        row += [_plain(g.settings.get(k)) for k in setting_keys]
        row.append(_sample_cell(g))
        rows.append(row)
    out += ["", "Param groups", format_table(headers, rows)]

    s = report.schedule
    out += ["", "Schedule"]
    bits = [f"type {s.type}"]
    if s.num_warmup_steps is not None:
        bits.append(f"warmup {s.num_warmup_steps} steps")
    if s.num_training_steps is not None:
        bits.append(f"total {s.num_training_steps} steps")
    if s.kwargs:
        bits.append(", ".join(f"{k}={v!r}" for k, v in s.kwargs.items()))
    bits.append(f"({s.method})")
    out.append(", ".join(bits[:-1]) + " " + bits[-1])
    if s.key_steps:
        names = [g.name for g in report.groups]
        rows = [[label, step] + [_lr(v) for v in lrs] for label, step, lrs in s.key_steps]
        if s.final_lrs is not None and s.method != "constant":
            rows.append(["final", s.num_training_steps] + [_lr(v) for v in s.final_lrs])
        out.append(format_table(["at", "step"] + [f"lr {n}" for n in names], rows))
    if s.note:
        out.append(f"note: {s.note}")

    out += ["", "Optimizer-state memory"]
    if report.memory_estimate is not None:
        out.append("estimate: " + str(report.memory_estimate).replace("\n", "\n          "))
    if report.memory_actual is not None:
        out.append("actual:   " + str(report.memory_actual).replace("\n", "\n          "))
    elif report.memory_estimate is not None:
        out.append("actual:   none yet (the state is allocated on the first optimizer step)")
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out)
