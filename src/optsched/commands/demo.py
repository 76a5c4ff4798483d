"""``optsched demo``: train the built-in tiny transformer on a synthetic task, end to end, on CPU.

What it shows, in order: the parameter groups the Trainer built (a table), a progress bar while it
trains with the seed's setup (AdamW, linear schedule with 10% warmup, weight decay 0.01), the loss
falling (first vs last logged loss, eval loss and accuracy), the checkpoints written in HF's layout,
and the learning-rate curve as a PNG (when matplotlib is installed). Everything goes into
``--output-dir`` (``./optsched-demo``); ``optsched demo --resume`` continues from the newest
checkpoint there, e.g. after Ctrl-C, or with a larger ``--max-steps``.

Ctrl-C or SIGTERM while it trains saves a checkpoint at the current step, prints how to continue, and
exits with the shell's status for that signal (130 for SIGINT, 143 for SIGTERM), not 0: a script or a
job scheduler must not take a preempted run for a finished one.

Nothing is downloaded: the model (:mod:`optsched.demo`) and the data are built in code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HELP = "Train a tiny transformer on a synthetic task (AdamW + linear warmup): groups, loss, checkpoints, lr curve."

DEFAULT_OUTPUT_DIR = "optsched-demo"
DEFAULT_MAX_STEPS = 400
EVAL_EXAMPLES = 512
SAMPLE_NAMES = 2  # parameter names shown per group
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


def build_parser():
    """The ``optsched demo`` parser (values are checked here, so a bad flag exits 2 before training)."""
    from jsonargparse import ArgumentParser
    from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

    from optsched.commands import spellings

    parser = ArgumentParser(
        prog="optsched demo", description=__doc__.split("\n\n")[0], exit_on_error=False, allow_abbrev=False
    )
    parser.add_argument(*spellings("output_dir"), dest="output_dir", type=str, default=DEFAULT_OUTPUT_DIR,
                        help="where checkpoints, logs and lr_curve.png go")
    parser.add_argument(*spellings("max_steps"), dest="max_steps", type=PositiveInt, default=DEFAULT_MAX_STEPS,
                        help="optimizer steps to train (ignored when --epochs is given)")
    parser.add_argument(*spellings("epochs", "num_train_epochs"), dest="epochs", type=PositiveFloat | None,
                        default=None, help="train this many epochs over the training set instead of --max-steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--seed", type=NonNegativeInt, default=42, help="seeds the model, the data order and the data")
    parser.add_argument("--task", type=str, default="majority", help="synthetic task: majority or marker")
    parser.add_argument(*spellings("batch_size", "per_device_train_batch_size"), dest="batch_size",
                        type=PositiveInt, default=32, help="per-device train batch size")
    parser.add_argument(*spellings("learning_rate", "lr"), dest="learning_rate", type=PositiveFloat, default=1e-3,
                        help="peak learning rate (the seed's 5e-5 is for fine-tuning, far too low from scratch)")
    parser.add_argument(*spellings("num_examples"), dest="num_examples", type=PositiveInt, default=2048,
                        help="training set size")
    parser.add_argument(*spellings("save_steps"), dest="save_steps", type=PositiveInt | None, default=None,
                        help="checkpoint every N steps (default: a quarter of the run)")
    parser.add_argument(*spellings("logging_steps"), dest="logging_steps", type=PositiveInt, default=20,
                        help="log the loss every N steps")
    parser.add_argument("--threads", type=PositiveInt, default=1,
                        help="torch CPU threads; the model is tiny, so more threads mostly add synchronisation")
    parser.add_argument(*spellings("no_progress"), dest="no_progress", action="store_true",
                        help="hide the progress bar")
    return parser


# --------------------------------------------------------------------------------------------------
# pure helpers (tested directly)
# --------------------------------------------------------------------------------------------------


def _names_by_id(model: Any) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def format_param_groups(optimizer: Any, model: Any | None = None, samples: int = SAMPLE_NAMES) -> str:
    """A compact table of ``optimizer.param_groups``: group name, tensors, elements, lr, weight decay
    and the first ``samples`` parameter names.

    Names come from the group's ``param_names`` key (the param-group contract); for groups without
    it (an optimizer built by hand) they are looked up in ``model`` by identity, else shown as ``?``.
    The lr column is the group's base lr (``initial_lr`` once a scheduler is attached).
    """
    lookup = _names_by_id(model) if model is not None else {}
    rows = [("#", "group", "tensors", "elements", "lr", "weight_decay", "sample names")]
    for index, group in enumerate(optimizer.param_groups):
        params = group["params"]
        names = group.get("param_names") or [lookup.get(id(p), "?") for p in params]
        shown = ", ".join(names[:samples]) + (", ..." if len(names) > samples else "")
        rows.append((
            str(index),
            str(group.get("name", f"group_{index}")),
            str(len(params)),
            f"{sum(p.numel() for p in params):,}",
            f"{group.get('initial_lr', group.get('lr', float('nan'))):.3g}",
            f"{group.get('weight_decay', 0.0):g}",
            shown,
        ))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    right = {2, 3}  # numeric columns
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if col in right else cell.ljust(w) for col, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def logged_losses(log_history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training-loss entry of a Trainer's ``log_history``, in order."""
    return [(int(entry.get("step", 0)), float(entry["loss"])) for entry in log_history if "loss" in entry]


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-N`` holding ``trainer_state.json``) in ``output_dir``, oldest
    first by step. A directory without ``trainer_state.json`` is an interrupted save and is skipped."""
    root = Path(output_dir)
    if not os.path.isdir(root):  # False, not an OSError, for a name too long
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(checkpoint: str | Path) -> int:
    """``global_step`` recorded in a checkpoint's ``trainer_state.json``."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state["global_step"])


# --------------------------------------------------------------------------------------------------
# the lr-curve picture (drawn by optsched.schedules.render, shared with `optsched schedule`)
# --------------------------------------------------------------------------------------------------


def lr_curve(scheduler: Any, num_steps: int) -> list[float]:
    """The first group's lr at steps ``0 .. num_steps`` from the schedule's closed form
    (``ScheduleLR.lr_at``): no optimizer is stepped."""
    if not hasattr(scheduler, "lr_at"):
        raise TypeError(
            f"the lr curve needs optsched's ScheduleLR (with lr_at(step)), got {type(scheduler).__name__}."
        )
    return [float(scheduler.lr_at(step)[0]) for step in range(num_steps + 1)]


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and its parents) and check that files can be made in it, so that a path
    that cannot be used fails before training, not at the first checkpoint.

    Raises:
        UsageError: it is a file, cannot be created, or cannot be written to (the system's reason).
    """
    from optsched.commands import UsageError
    from optsched.trainer.checkpoint import make_writable_dir

    accepted = "a folder (new or existing) you can write to"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):  # False for a bad path, no OSError
        raise UsageError(f"--output-dir={str(output_dir)!r} is a file, not a folder; accepted: {accepted}.")
    try:
        make_writable_dir(output_dir)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UsageError(
            f"--output-dir={str(output_dir)!r}: cannot write there ({reason}); accepted: {accepted}."
        ) from None


#: flags that describe the run itself: a resume must repeat them, or it trains on other data or another
#: plan from the checkpoint (the data is drawn from --num-examples, --task and --seed)
_RUN_FLAGS = ("task", "seed", "num_examples", "batch_size", "learning_rate", "save_steps", "logging_steps")


def continue_command(cfg: Any, output_dir: Path, duration: str) -> str:
    """The ``optsched demo ... --resume`` line that continues this run: the run's own flags where they
    differ from the defaults, then ``duration`` (``--max-steps 800``, ``--epochs 2``).

    Example: a run with ``--task marker --max-steps 40`` goes on with ``optsched demo --output-dir
    optsched-demo --task marker --resume --max-steps 80``, not on the default task.
    """
    defaults = build_parser().get_defaults()
    flags = [f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in _RUN_FLAGS
             if getattr(cfg, name) != defaults[name]]
    return " ".join(["optsched demo --output-dir", str(output_dir), *flags, "--resume", duration])


def _training_arguments(cfg: Any, output_dir: Path):
    from optsched import TrainingArguments

    max_steps = -1 if cfg.epochs is not None else cfg.max_steps
    # the run's length in steps, for the default checkpoint interval (a quarter of it): --epochs counts
    # as the Trainer will (one step per batch, a partial batch included)
    planned = cfg.max_steps if cfg.epochs is None else math.ceil(cfg.epochs * math.ceil(cfg.num_examples / cfg.batch_size))
    save_steps = cfg.save_steps or max(1, planned // 4)
    return TrainingArguments(
        output_dir=str(output_dir),
        # the seed's setup: AdamW, linear decay after a 10% warmup, weight decay on matrices only
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_ratio=0.1,
        weight_decay=0.01,
        learning_rate=cfg.learning_rate,
        max_steps=max_steps,
        num_train_epochs=cfg.epochs if cfg.epochs is not None else 3.0,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=256,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        eval_strategy="no",
        seed=cfg.seed,
        use_cpu=True,
        disable_tqdm=cfg.no_progress,
    )


def run(cfg: Any) -> int:
    """Train (or resume) the demo; prints what happens.

    Returns:
        0, or 128 + the signal's number (130, 143) when SIGINT / SIGTERM stopped training early.
    """
    import torch

    from optsched._validation import check_choice
    from optsched.demo import TASKS

    task = check_choice("--task", cfg.task, TASKS, what="task")
    output_dir = Path(cfg.output_dir)
    checkpoints = find_checkpoints(output_dir)
    resume_from = None
    if cfg.resume:
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume found no checkpoint in {str(output_dir)!r}; run 'optsched demo "
                f"--output-dir {output_dir}' first (or drop --resume)."
            )
        resume_from = checkpoints[-1]
        done = checkpoint_step(resume_from)
        if cfg.epochs is None and done >= cfg.max_steps:
            print(f"{resume_from} is already at step {done} of --max-steps {cfg.max_steps}; "
                  f"pass a larger --max-steps to train further: "
                  f"{continue_command(cfg, output_dir, f'--max-steps {2 * cfg.max_steps}')}")
            return 0
    elif checkpoints:
        print(f"note: {output_dir} holds {checkpoints[-1].name}; training from scratch "
              "(pass --resume to continue from it).")
    prepare_output_dir(output_dir)

    # for 20k parameters one thread is fastest (no intra-op syncs), and much faster than several on a
    # busy machine; the caller's setting is restored afterwards (run() may be called in-process)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, task, output_dir, resume_from)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Any, task: str, output_dir: Path, resume_from: Path | None) -> int:
    import torch

    from optsched import Trainer
    from optsched.demo import build_dataset, build_model, chance_loss, evaluate_accuracy

    torch.manual_seed(cfg.seed)
    model = build_model()
    train_dataset = build_dataset(cfg.num_examples, task=task, seed=cfg.seed)
    eval_dataset = build_dataset(EVAL_EXAMPLES, task=task, seed=cfg.seed + 1)
    args = _training_arguments(cfg, output_dir)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"optsched demo: {type(model).__name__} ({n_params:,} parameters), task {task!r}, "
          f"{len(train_dataset)} training / {len(eval_dataset)} eval sequences")
    print(f"optimizer {type(trainer.optimizer).__name__} (optim={args.optim!r}), "
          f"lr_scheduler_type={args.lr_scheduler_type!r}, warmup_ratio={args.warmup_ratio}; parameter groups:")
    print(format_param_groups(trainer.optimizer, model))
    # the fresh model's accuracy (chance level); a resumed run loads its weights inside train()
    before = "" if resume_from is not None else f"before training {evaluate_accuracy(model, eval_dataset):.1%}, "
    if resume_from is not None:
        print(f"resuming from {resume_from}")

    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)

    losses = logged_losses(trainer.state.log_history)
    metrics = trainer.evaluate()
    accuracy = evaluate_accuracy(model, eval_dataset)
    if len(losses) >= 2:
        (first_step, first), (last_step, last) = losses[0], losses[-1]
        trend = "fell" if last < first else "did not fall"
        print(f"loss {trend}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step} "
              f"(chance: {chance_loss():.4f})")
    elif losses:  # one value says nothing about a trend
        (step, loss), = losses
        print(f"loss {loss:.4f} at step {step}, the only one logged (every --logging-steps {cfg.logging_steps}) "
              f"(chance: {chance_loss():.4f})")
    else:
        print(f"no training loss was logged (fewer than --logging-steps {cfg.logging_steps} steps run)")
    print(f"eval: loss {metrics['eval_loss']:.4f}, accuracy {accuracy:.1%} ({before}chance 50.0%)")

    saved = find_checkpoints(output_dir)
    print(f"checkpoints in {output_dir}: {', '.join(p.name for p in saved) or 'none'}")
    total_steps = trainer.state.max_steps
    try:
        from optsched.schedules.render import save_png

        warmup = int(trainer.lr_scheduler.state_dict()["spec"]["num_warmup_steps"])
        png = save_png({"lr": lr_curve(trainer.lr_scheduler, total_steps)}, output_dir / "lr_curve.png",
                       f"optsched demo: {args.lr_scheduler_type}, {warmup} warmup of {total_steps} steps",
                       num_warmup_steps=warmup)
        print(f"lr curve: {png}")
    except ImportError as exc:
        print(f"lr curve: skipped ({exc})")
    if trainer.preempted_by is not None:  # Ctrl-C / SIGTERM: the same plan again, from where it stopped
        from optsched.trainer.signals import signal_exit_status

        duration = f"--max-steps {cfg.max_steps}" if cfg.epochs is None else f"--epochs {cfg.epochs:g}"
        print(f"stopped by {trainer.preempted_by} at step {trainer.state.global_step} of {total_steps}; "
              f"continue with: {continue_command(cfg, output_dir, duration)}")
        return signal_exit_status(trainer.preempted_by)  # not finished: 130 / 143, as the shell reports
    print(f"continue with: {continue_command(cfg, output_dir, f'--max-steps {2 * total_steps}')}")
    return 0
