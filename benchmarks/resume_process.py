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

``--cold`` drops the checkpoint's files from the page cache in each new process instead
(``posix_fadvise(POSIX_FADV_DONTNEED)``, Linux): the load then reads the disk, as a resume after a
reboot does.

Run: ``python -m benchmarks.resume_process [--rounds 12] [--params 50e6] [--cold]``

Prints ``resume load[ (checkpoint_verification='size')] <label>[ cold]: ours X s, reference Y s, ratio Z``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks._machine import Row, in_new_process, quiet

__all__ = ["main", "run"]

SIDES = ("optsched", "optsched-size", "transformers")
_RESULT = "RESUME-SECONDS"


def evict_from_page_cache(directory: Path) -> bool:
    """Drop ``directory``'s files from the page cache (``posix_fadvise(DONTNEED)``; they must be written
    back already, ``os.sync()``), so that the next read comes from the disk. ``False`` where the OS has no
    ``posix_fadvise`` (macOS, Windows): nothing is dropped."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in sorted(directory.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _child(side: str, path: Path, num_params: float, cold: bool) -> None:
    """In the new process: build the side's trainer, warm the page cache with the checkpoint's files (or
    drop them from it: ``cold``), time one load, print it."""
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
            if not cold:
                _into_page_cache(path)
            elif not evict_from_page_cache(path):
                raise RuntimeError("no posix_fadvise here: a load from a cold page cache cannot be measured")
            seconds = time_once(lambda: load(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{_RESULT} {seconds!r}", flush=True)


def _load_in_new_process(side: str, path: Path, num_params: float, cold: bool) -> float:
    output = in_new_process("resume_process", ["--child", side, str(path), "--params", repr(num_params),
                                               *(["--cold"] if cold else [])], show=False)
    for line in output.splitlines():
        if line.startswith(_RESULT):
            return float(line.split()[1])
    raise RuntimeError(f"the {side} load in a new process printed no {_RESULT} line: {output[-2000:]}")


def _run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
         cold: bool = False) -> list[Row]:
    """Median seconds of a resume's load in a new process, per side; returns the report rows.

    Args:
        quick: a 200k-parameter model, one round (smoke test).
        num_params: model size (default 50M).
        rounds: new processes per side (default 12: single loads swing 0.2-1.1 s on this VM, and with 6
            the medians flipped between runs).
        cold: the checkpoint's files are dropped from the page cache before each load (read from the
            disk, as after a reboot), instead of read once untimed.
    """
    from benchmarks.checkpoint_io import _optsched_side, _transformers_side

    num_params = num_params or (2e5 if quick else 50e6)
    rounds = rounds or (1 if quick else 12)
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
                times[side].append(_load_in_new_process(side, paths[side], num_params, cold))
            order.reverse()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    label = f"{num_params / 1e6:.1f}M" if quick else f"{num_params / 1e6:.0f}M"
    where = "cold page cache" if cold else "new process"
    ref = statistics.median(times["transformers"])
    rows = []
    for side, note in (("optsched", ""), ("optsched-size", " (checkpoint_verification='size')")):
        mine = statistics.median(times[side])
        # The processes of a round run one after the other: their ratio is spared the slower drifts.
        paired = statistics.median(r / m for r, m in zip(times["transformers"], times[side]))
        print(f"resume load{note} {label}{' cold' if cold else ''}: ours {mine:.4g} s, reference {ref:.4g} s, "
              f"ratio {ref / mine:.3g}",
              flush=True)
        rows.append(Row(4, f"resume load{note} {label} + AdamW state, {where}", "s", mine, ref,
                        "transformers Trainer", None, ref / mine, "no slower (ratio >= 1)", ref / mine >= 1.0,
                        f"median of {rounds} processes per side (median of the rounds' ratios: {paired:.3g}); "
                        "ours " + " ".join(f"{t:.3f}" for t in times[side])
                        + ", reference " + " ".join(f"{t:.3f}" for t in times["transformers"])))
    return rows


def run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
        cold: bool = False) -> list[Row]:
    """Question 4 in new processes (see :func:`_run`), with log records and warnings silenced."""
    with quiet():
        return _run(quick, num_params=num_params, rounds=rounds, cold=cold)


def main(argv: list[str] | None = None) -> list[Row] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (default 50e6)")
    parser.add_argument("--rounds", type=int, default=None, help="new processes per side (default 12)")
    parser.add_argument("--cold", action="store_true", help="load from the disk: files dropped from the page cache")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        side, path = opts.child
        if side not in SIDES:
            parser.error(f"--child side={side!r} is not one of {SIDES}")
        _child(side, Path(path), opts.params or 50e6, opts.cold)
        return None
    return run(opts.quick, num_params=opts.params, rounds=opts.rounds, cold=opts.cold)


if __name__ == "__main__":
    main()
