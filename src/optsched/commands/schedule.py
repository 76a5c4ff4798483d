"""``optsched schedule NAME``: draw a learning-rate schedule in the terminal (and as a PNG).

Example::

    optsched schedule cosine --warmup-steps 100 --steps 1000 --lr 3e-4
    optsched schedule warmup_stable_decay --warmup-steps 50 --steps 500 --kw num_decay_steps=100 --png wsd.png

The schedule is built exactly as training builds it (``get_scheduler`` on a one-parameter optimizer
with ``lr``), so a name, warmup, total or kwarg that training would refuse is refused here too. A run
of any length costs about the same: past a few thousand steps the lr is evaluated at a bounded sample
of steps that draws the same chart (:func:`optsched.schedules.sampling.sample_steps`), and at the key
steps exactly.
"""

from __future__ import annotations

import json
from typing import Any

HELP = "Print a learning-rate schedule as a terminal chart (and a PNG with --png)."

__all__ = ["HELP", "build_parser", "parse_kw", "run"]


def build_parser():
    """The ``schedule`` subcommand's parser (``jsonargparse``, errors raised, not exited)."""
    from jsonargparse import ArgumentParser

    from optsched.commands import spellings
    from optsched.schedules.registry import CLOSED_FORM, list_schedulers

    parser = ArgumentParser(prog="optsched schedule", description=HELP, exit_on_error=False, allow_abbrev=False)
    names = ", ".join(list_schedulers(CLOSED_FORM))
    parser.add_argument("name", type=str, help=f"Schedule name or alias: {names}.")
    # Each option also answers to transformers' names for it (get_scheduler's, TrainingArguments').
    parser.add_argument(
        *spellings("warmup_steps", "num_warmup_steps"), dest="warmup_steps", type=int,
        default=0, help="Warmup length in optimizer steps (default 0).",
    )
    parser.add_argument(
        *spellings("steps", "num_training_steps", "max_steps"), dest="steps", type=int, required=True,
        help="Total number of optimizer steps.",
    )
    parser.add_argument(
        *spellings("lr", "learning_rate"), dest="lr", type=float, default=5e-5,
        help="Base learning rate (default 5e-5, as HF).",
    )
    parser.add_argument(
        "--kw",
        type=str,
        action="append",
        default=None,
        help="A schedule kwarg as key=value (JSON value, else a string); repeat for several.",
    )
    parser.add_argument(
        "--png", type=str, default=None,
        help="Also write the curve to this PNG file (.png is added to a name without a suffix).",
    )
    parser.add_argument("--width", type=int, default=60, help="Chart width in characters (default 60).")
    parser.add_argument("--height", type=int, default=15, help="Chart height in lines (default 15).")
    return parser


def parse_kw(items: list[str] | None) -> dict[str, Any]:
    """``["num_cycles=2", "decay_type=linear"]`` -> ``{"num_cycles": 2, "decay_type": "linear"}``.

    Values are read as JSON (numbers, ``true``, ``null``, lists), anything else stays a string.

    Raises:
        ValueError: an item without ``=`` or with an empty key, or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--kw {item!r} is not key=value; accepted: e.g. --kw num_cycles=2.")
        if key in out:
            raise ValueError(f"--kw {key!r} is given twice; accepted: each key once.")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def run(cfg: Any) -> int:
    """Build the schedule, print the chart and the lr at the key steps; write the PNG if asked."""
    import torch

    from optsched._validation import check_number
    from optsched.commands import chart_flags, write_png
    from optsched.schedules import get_schedule_info, get_scheduler
    from optsched.schedules.registry import METRIC
    from optsched.schedules.render import ascii_chart, format_key_points, key_points
    from optsched.schedules.sampling import critical_steps, sample_steps

    info = get_schedule_info(cfg.name)  # ValueError with "did you mean" for an unknown name
    if info.kind == METRIC:
        raise ValueError(
            f"{info.name!r} is metric-driven (it changes the lr when the eval metric stops improving), so it "
            "has no fixed curve to draw; pick a closed-form schedule such as linear or cosine."
        )
    lr = check_number("--lr", cfg.lr, low=0.0, low_open=True)
    png = chart_flags(cfg)  # refused before any work
    kwargs = parse_kw(cfg.kw)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = get_scheduler(
        info.name,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.steps,
        scheduler_specific_kwargs=kwargs,
    )
    # a bounded sample that draws the chart of every step (every step of a short run), key steps exact
    keys = [step for _, step in key_points(cfg.steps, cfg.warmup_steps)]
    steps = sample_steps(cfg.steps, width=cfg.width, critical=critical_steps(scheduler.schedule, cfg.steps) + keys)
    lrs = [scheduler.lr_at(step)[0] for step in steps]
    written = None
    if png is not None:  # written first: a file that cannot be written is the only output
        written = write_png(
            {info.name: lrs},
            png,
            title=f"{info.name} (warmup {cfg.warmup_steps}, {cfg.steps} steps)",
            num_warmup_steps=cfg.warmup_steps or None,
            steps=steps,
        )
    spec = scheduler.spec
    kw_text = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    print(
        f"{info.name}: warmup {cfg.warmup_steps} steps, {cfg.steps} steps, lr {lr:g}"
        + (f", {kw_text}" if kw_text else "")
    )
    print(ascii_chart(lrs, width=cfg.width, height=cfg.height, steps=steps))
    print(format_key_points(dict(zip(steps, lrs)), cfg.warmup_steps, num_steps=cfg.steps))
    if written is not None:
        print(f"wrote {written}")
    return 0
