"""Question 4, as a resume pays it: loading a checkpoint in a new process, optsched vs transformers.

``benchmarks.checkpoint_io`` loads in a loop inside one process; a resume loads once, in a process
that has just built its model and optimizer and never held the optimizer state. Here each load runs
in a new Python process (``python -m benchmarks.resume_process --child SIDE PATH``) that builds its
trainer (question 2's 50M-parameter model, default AdamW, no step taken: the state is empty, as in a
resume), reads the checkpoint's files once (untimed: both sides read from the page cache), then times
what ``train(resume_from_checkpoint=)`` runs (``checkpoint_io``'s load of the side) and prints it.
The checkpoints are saved once, by the parent, with each side's Trainer. Sides alternate, medians
over rounds. On this VM the first touches of memory a process makes cost what the hypervisor makes
them cost: single loads swing 0.2-1 s on either side, so read the medians.

Run: ``python -m benchmarks.resume_process [--rounds 6] [--params 50e6]``

Prints ``resume load[ (checkpoint_verification='size')] <label>: ours X s, reference Y s, ratio Z``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._machine import Row, quiet

__all__ = ["main", "run"]

SIDES = ("optsched", "optsched-size", "transformers")
_RESULT = "RESUME-SECONDS"


def _child(side: str, path: Path, num_params: float) -> None:
    """In the new process: build the side's trainer, warm the page cache, time one load, print it."""
    import torch

    from benchmarks._timing import time_once
    from benchmarks.checkpoint_io import _into_page_cache, _optsched_side, _transformers_side

    torch.set_num_threads(1)  # as every other question
    scratch = Path(tempfile.mkdtemp(prefix="optsched-bench-resume-"))
    try:
        with quiet(), contextlib.redirect_stdout(io.StringIO()):
            if side == "transformers":
                load = _transformers_side(num_params, scratch, take_step=False)[1]
            else:
                verify = "size" if side == "optsched-size" else "full"
                load = _optsched_side(num_params, scratch, verify, take_step=False)[1]
            _into_page_cache(path)
            seconds = time_once(lambda: load(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{_RESULT} {seconds!r}", flush=True)


def _load_in_new_process(side: str, path: Path, num_params: float) -> float:
    command = [sys.executable, "-m", "benchmarks.resume_process", "--child", side, str(path),
               "--params", repr(num_params)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT):
            return float(line.split()[1])
    raise RuntimeError(f"the {side} load in a new process failed (exit {done.returncode}): {done.stderr[-2000:]}")


def _run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None) -> list[Row]:
    """Median seconds of a resume's load in a new process, per side; returns the report rows."""
    from benchmarks.checkpoint_io import _optsched_side, _transformers_side

    num_params = num_params or (2e5 if quick else 50e6)
    rounds = rounds or (1 if quick else 6)
    root = Path(tempfile.mkdtemp(prefix="optsched-bench-resume-"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ours = _optsched_side(num_params, root / "optsched")
            theirs = _transformers_side(num_params, root / "transformers")
            paths = {"optsched": ours[0](), "transformers": theirs[0]()}
        ours[3]()  # optsched's flush to disk, then the kernel's writeback: no load runs beside a write
        os.sync()
        paths["optsched-size"] = paths["optsched"]
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        order = list(SIDES)
        for _ in range(rounds):
            for side in order:
                times[side].append(_load_in_new_process(side, paths[side], num_params))
            order.reverse()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    label = f"{num_params / 1e6:.1f}M" if quick else f"{num_params / 1e6:.0f}M"
    ref = statistics.median(times["transformers"])
    rows = []
    for side, note in (("optsched", ""), ("optsched-size", " (checkpoint_verification='size')")):
        mine = statistics.median(times[side])
        print(f"resume load{note} {label}: ours {mine:.4g} s, reference {ref:.4g} s, ratio {ref / mine:.3g}",
              flush=True)
        rows.append(Row(4, f"resume load{note} {label} + AdamW state, new process", "s", mine, ref,
                        "transformers Trainer", None, ref / mine, "no slower (ratio >= 1)", ref / mine >= 1.0,
                        f"median of {rounds} processes per side; ours " + " ".join(f"{t:.3f}" for t in times[side])
                        + ", reference " + " ".join(f"{t:.3f}" for t in times["transformers"])))
    return rows


def run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None) -> list[Row]:
    """Question 4 in new processes (see :func:`_run`), with log records and warnings silenced."""
    with quiet():
        return _run(quick, num_params=num_params, rounds=rounds)


def main(argv: list[str] | None = None) -> list[Row] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (default 50e6)")
    parser.add_argument("--rounds", type=int, default=None, help="new processes per side (default 6)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        side, path = opts.child
        if side not in SIDES:
            parser.error(f"--child side={side!r} is not one of {SIDES}")
        _child(side, Path(path), opts.params or 50e6)
        return None
    return run(opts.quick, num_params=opts.params, rounds=opts.rounds)


if __name__ == "__main__":
    main()
