"""``optsched plan``: explain an optimizer / schedule setup before training it.

Example::

    optsched plan                                    # the built-in demo model, HF's defaults
    optsched plan --model mypkg.models:build --config args.yaml --learning_rate 3e-4 \\
        --lr_scheduler_type cosine --warmup_steps 0.1 --steps 1000 --png plan.png

The model comes from a factory ``MODULE:FACTORY`` called without arguments (default
``optsched.demo:build_model``). Every ``TrainingArguments`` field is a flag (``--learning_rate`` or
``--learning-rate``), generated from the dataclass fields and their help; ``--config`` reads a YAML
(or JSON) file of the same fields. Only the fields given in the file or as flags count as set by the
user (``explicit_fields``); later ones win. The optimizer and scheduler are built with optsched's
public ``create_optimizer`` / ``create_scheduler``, so what is printed is what training gets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import typing
from collections.abc import Sequence
from typing import Any

HELP = "Explain the param groups, lr schedule and optimizer memory a setup gives (and draw the lr curves)."

DEFAULT_MODEL = "optsched.demo:build_model"

__all__ = ["DEFAULT_MODEL", "HELP", "build_parser", "load_factory", "run", "training_arguments_from_cfg"]

# options of the command itself: never TrainingArguments fields
_OWN = ("model", "config", "steps", "png", "width", "height", "__path__")


def _field_types() -> dict[str, Any]:
    from optsched.arguments import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(TrainingArguments)}


def build_parser():
    """The ``plan`` subcommand's parser: own options plus one flag per ``TrainingArguments`` field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="optsched plan", description=HELP, exit_on_error=False, allow_abbrev=False)
    parser.add_argument(
        "--model", type=str, default=DEFAULT_MODEL,
        help=f"Model factory MODULE:FACTORY, called without arguments (default {DEFAULT_MODEL}).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file of TrainingArguments fields.")
    parser.add_argument("--steps", type=typing.Optional[int], default=None,
                        help="Number of optimizer steps (default: max_steps).")
    parser.add_argument("--png", type=typing.Optional[str], default=None,
                        help="Also write the lr curves to this PNG file (.png is added to a name without a suffix).")
    parser.add_argument("--width", type=int, default=60, help="Chart width in characters (default 60).")
    parser.add_argument("--height", type=int, default=12, help="Chart height in lines (default 12).")
    group = parser.add_argument_group("TrainingArguments", "Any field of optsched.TrainingArguments.")
    for name, (kind, text) in _field_types().items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += ["--lr"] if name == "learning_rate" else []  # what `optsched schedule` calls it
        # SUPPRESS: a field not given stays absent, so the given ones are exactly the explicit ones
        group.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS, help=text)
    return parser


def training_arguments_from_cfg(cfg: Any):
    """``TrainingArguments.from_dict`` of the fields present in ``cfg`` (flags and config file),
    with exactly those as ``explicit_fields``."""
    from optsched.arguments import TrainingArguments

    values = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(vars(cfg))
    fields = {k: v for k, v in values.items() if k not in _OWN}
    return TrainingArguments.from_dict(fields, explicit_fields=sorted(fields))


def load_factory(spec: str):
    """``"pkg.module:factory"`` -> the callable.

    Raises:
        ValueError: not ``MODULE:FACTORY``, the module cannot be imported, or it has no such attribute.
        TypeError: the attribute is not callable.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model={spec!r} is not MODULE:FACTORY; accepted: e.g. {DEFAULT_MODEL}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model={spec!r}: cannot import module {module_name!r} ({exc}).") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            from optsched._validation import did_you_mean

            names = [n for n in dir(target) if not n.startswith("_")]
            raise ValueError(f"--model={spec!r}: {module_name!r} has no attribute {attr!r}.{did_you_mean(part, names)}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"--model={spec!r} is a {type(target).__name__}, not a callable factory.")
    return target


def _curves(
    report: Any, optimizer: Any, scheduler: Any, steps: int, width: int
) -> tuple[Sequence[int], dict[str, list[float]]] | None:
    """The sampled steps and each group's lr at them (closed form, or stepped on a copy), None when
    unknown.

    The steps are :func:`~optsched.schedules.sampling.sample_steps`: every step of a short run, else a
    bounded sample that draws the same chart (a ``ScheduleLR``'s critical steps are known). A scheduler
    that is not closed form is stepped through every step up to the last one, which is linear in time
    (and limited to ``MAX_SAMPLED_STEPS`` by ``describe_schedule``), but only the sampled lrs are kept.
    """
    from optsched.plan import sample_lrs
    from optsched.schedules import ScheduleLR
    from optsched.schedules.sampling import critical_steps, sample_steps

    keys = [step for _, step, _ in report.schedule.key_steps]
    if isinstance(scheduler, ScheduleLR):
        at_steps = sample_steps(steps, width=width, critical=critical_steps(scheduler.schedule, steps) + keys)
        per_step = [scheduler.lr_at(s) for s in at_steps]
    elif report.schedule.method == "sampled":
        at_steps = sample_steps(steps, width=width, critical=keys)
        at = sample_lrs(optimizer, scheduler, at_steps)
        per_step = [at[s] for s in at_steps]
    else:
        return None
    names = [g.name for g in report.groups]
    return at_steps, {name: [lrs[i] for lrs in per_step] for i, name in enumerate(names)}


def _dedupe(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """Groups with the same curve share one line: ``"decay = no_decay"``."""
    out: dict[str, list[float]] = {}
    by_values: dict[tuple[float, ...], str] = {}
    for label, values in curves.items():
        key = tuple(values)
        if key in by_values:
            old = by_values[key]
            out[f"{old} = {label}"] = out.pop(old)
            by_values[key] = f"{old} = {label}"
        else:
            out[label] = values
            by_values[key] = label
    return out


def run(cfg: Any) -> int:
    """Build model, arguments, optimizer and scheduler; print the report and the curves; write the PNG."""
    from torch import nn

    from optsched._validation import check_int
    from optsched.commands import chart_flags, write_png
    from optsched.optim import create_optimizer
    from optsched.plan import explain
    from optsched.schedules import create_scheduler
    from optsched.schedules.render import ascii_chart

    args = training_arguments_from_cfg(cfg)
    steps = cfg.steps if cfg.steps is not None else (args.max_steps if args.max_steps > 0 else None)
    if steps is None:
        raise ValueError(
            "the number of optimizer steps is unknown: --steps is not given and max_steps="
            f"{args.max_steps!r}; accepted: --steps T or --max_steps T (an integer >= 1)."
        )
    steps = check_int("--steps", steps, low=1)
    png = chart_flags(cfg)  # refused before any work
    model = load_factory(cfg.model)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model={cfg.model!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    optimizer = create_optimizer(model, args, num_training_steps=steps)
    scheduler = create_scheduler(optimizer, args, steps)
    report = explain(optimizer, scheduler, model, num_training_steps=steps)
    sampled = _curves(report, optimizer, scheduler, steps, cfg.width)
    at_steps, curves = sampled if sampled is not None else (None, None)
    if curves is None and png is not None:
        raise ValueError(
            f"--png={cfg.png!r}: the {report.schedule.type!r} schedule has no curve to draw "
            f"({report.schedule.note}); accepted: a closed-form lr_scheduler_type such as linear or cosine."
        )
    written = None
    if curves is not None:
        curves = _dedupe(curves)
        if png is not None:  # written first: a file that cannot be written is the only output
            written = write_png(curves, png, title=f"{report.schedule.type}: lr per param group ({steps} steps)",
                                num_warmup_steps=report.schedule.num_warmup_steps or None, steps=at_steps)
    print(f"optsched plan: model {cfg.model}, optim={args.optim}, lr_scheduler_type={args.lr_scheduler_type}, "
          f"{steps} steps")
    print(report)
    if curves is None:
        print("\n(no lr curve: the schedule cannot be evaluated in advance)")
    else:
        print("\nLearning rate per group")
        print(ascii_chart(curves, width=cfg.width, height=cfg.height, steps=at_steps))
        if written is not None:
            print(f"wrote {written}")
    return 0
