"""Question 4: how long do saving and loading a training checkpoint take, and how large is it?

The model is question 2's 50M-parameter fp32 model (``benchmarks.optimizer_step.build_model``) with
one AdamW step taken, so the optimizer holds its full state (``exp_avg``, ``exp_avg_sq``: 2 x 200 MB).
Both trainers use their default optimizer (torch's fused AdamW) and a linear schedule over 100 steps.

* **save**: optsched ``Trainer._save_checkpoint()`` vs transformers ``Trainer._save_checkpoint(model,
  None)``: weights (``model.safetensors``), ``optimizer.pt``, ``scheduler.pt``, RNG state,
  ``trainer_state.json`` (optsched also writes ``training_args.json``; transformers ``training_args.bin``
  is written by ``save_model`` only at the end of training).
* **load**: optsched ``checkpoint.load_weights_and_read_optimizer`` (a worker thread checks and copies
  the weights, then checksums optimizer records ``torch.load`` has not reached; ``torch.load``'s own
  reads checksum the others) + ``load_trainer_state`` +
  ``Trainer._load_optimizer_and_scheduler`` + ``load_rng_state`` (what ``train(resume_from_checkpoint=)``
  runs) vs transformers ``_load_from_checkpoint`` + ``TrainerState.load_from_json`` +
  ``_load_optimizer_and_scheduler`` + ``_load_rng_state``.
* **bytes**: the sum of the checkpoint directory's file sizes.

Each load is timed twice per round, with glibc's allocator pinned in two states
(``benchmarks._allocator``): **fresh memory**, every large block comes from the kernel and is faulted
in on first touch, which is what a resume pays (the process has never held the optimizer state, so
nothing freed is there to reuse; loads in new processes measure the same, see BENCHMARKS.md): the
target rows; and **memory reused**, freed blocks kept for the next load, which is a loop of loads and
no resume: for information. Left to itself, glibc drifts between the two as its mmap threshold rises,
which made this question's load figures swing by up to 3x between runs. Saves run with memory reused
(a save comes mid-training).

Each round saves a new ``checkpoint-N`` with optsched and transformers in turn (alternating which
goes first; untimed before each save, the side's previous checkpoint is deleted and ``os.sync()``
runs, so that neither pays for the other's writeback or a deletion), then loads both, after another
untimed ``os.sync()`` and the end of optsched's flush thread (optsched's save returns before its
worker thread fsyncs the checkpoint; transformers never fsyncs): no load runs beside a 600 MB write
to the disk. Medians over rounds. Saves go to the page cache of the temp dir's disk and land at
page-cache speed (~0.2 s) unless the kernel's writeback throttles them (~1.5 s, either side at
random). Loads read the file just written, read once more just before (untimed: this VM pages out
page-cache regions it judges cold, so a load would otherwise read part of a fresh checkpoint from the
disk now and then, on either side). ``--dir /dev/shm`` measures in RAM (tmpfs): no writeback and no
page-out, so both figures are steady, but a tmpfs page is read more slowly (~12 GB/s by ``read``,
~7 GB/s mapped, against ~33 GB/s mapped from a disk's page cache).

Run: ``python -m benchmarks.checkpoint_io [--quick] [--rounds 10] [--params 50e6]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks._allocator import FRESH, REGIMES, REUSED, large_allocations
from benchmarks._machine import Row, quiet
from benchmarks._timing import time_once
from benchmarks.optimizer_step import build_model

__all__ = ["directory_bytes", "main", "run"]

STEPS = 100
LOADS_PER_ROUND = 3  # per side and allocator regime (an odd number: the order alternates within a round)
# save, load, set the step, wait for the save's background work
_Side = tuple[Callable[[], Path], Callable[[Path], None], Callable[[int], None], Callable[[], None]]


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _into_page_cache(directory: Path) -> None:
    """Read every file of ``directory`` once, so that a load finds all of it in the page cache.

    This VM's kernel pages out page-cache regions it judges cold (a DAMON ``pageout`` scheme, coarse
    and sampled): without this, a load now and then reads part of a checkpoint written a second
    earlier from the disk, 0.3-1 s instead of 0.07 s, on either side at random.
    """
    buffer = bytearray(16 << 20)
    for path in sorted(directory.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _optsched_side(num_params: float, out: Path, verify: str = "full", *, take_step: bool = True) -> _Side:
    from optsched import Trainer, TrainingArguments
    from optsched.trainer import checkpoint as ckpt

    args = TrainingArguments(output_dir=str(out), disable_tqdm=True, use_cpu=True, report_to="none",
                             checkpoint_verification=verify)
    trainer = Trainer(model=build_model(num_params), args=args)
    trainer.create_scheduler(num_training_steps=STEPS)
    if take_step:  # the optimizer state exists (a save needs it; a resume starts without it)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    trainer.state.global_step = 1
    trainer.state.max_steps = STEPS

    def save() -> Path:
        return trainer._save_checkpoint()

    def set_step(step: int) -> None:
        trainer.state.global_step = step

    def load(path: Path) -> None:  # what train(resume_from_checkpoint=path) runs, in its order
        saved_optimizer = ckpt.load_weights_and_read_optimizer(trainer.model, path, verify)  # two threads
        trainer.state = ckpt.load_trainer_state(path, verify=verify)
        trainer._load_optimizer_and_scheduler(path, saved_optimizer)  # reads args.checkpoint_verification
        ckpt.load_rng_state(path, trainer.dist, verify=verify)

    return save, load, set_step, trainer._finish_saves  # the flush to disk runs on a worker thread


def _transformers_side(num_params: float, out: Path, *, take_step: bool = True) -> _Side:
    import transformers
    from transformers.trainer_callback import TrainerState

    transformers.logging.set_verbosity_error()
    args = transformers.TrainingArguments(output_dir=str(out), disable_tqdm=True, use_cpu=True, report_to="none",
                                          save_strategy="steps")
    dataset = [{"x": torch.zeros(1)}]  # the Trainer wants one; nothing is trained
    trainer = transformers.Trainer(model=build_model(num_params), args=args, train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    if take_step:
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    trainer.state.global_step = 1
    trainer.state.max_steps = STEPS

    def save() -> Path:
        trainer._save_checkpoint(trainer.model, trial=None)
        return out / f"checkpoint-{trainer.state.global_step}"

    def set_step(step: int) -> None:
        trainer.state.global_step = step

    def load(path: Path) -> None:
        trainer._load_from_checkpoint(str(path))
        trainer.state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        trainer._load_optimizer_and_scheduler(str(path))
        trainer._load_rng_state(str(path))

    return save, load, set_step, lambda: None  # nothing in the background


def _check_same_state(ours: Path, theirs: Path) -> None:
    """Both checkpoints must hold the same optimizer state tensors (else the comparison is unfair)."""
    a = torch.load(ours / "optimizer.pt", weights_only=True)["state"]
    b = torch.load(theirs / "optimizer.pt", weights_only=True)["state"]
    if len(a) != len(b) or sorted(a[0]) != sorted(b[0]):
        raise RuntimeError(f"optimizer states differ: optsched {len(a)} x {sorted(a[0])}, "
                           f"transformers {len(b)} x {sorted(b[0])}")


def _run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
         directory: str | None = None) -> list[Row]:
    """Question 4; returns the report rows (save seconds, load seconds, bytes on disk).

    Args:
        quick: a 200k-parameter model and 2 rounds (smoke test).
        num_params: model size (default 50M).
        rounds: timed rounds (default 10, after 2 untimed ones); each saves once per side and loads
            :data:`LOADS_PER_ROUND` times per side in each allocator regime.
        directory: where the checkpoints go (default: the temp dir).
    """
    num_params = num_params or (2e5 if quick else 50e6)
    rounds = rounds or (2 if quick else 10)  # even: each side goes first equally often
    warmup = 1 if quick else 2  # the first rounds fault the VM's memory in: slow on either side
    loads = 1 if quick else LOADS_PER_ROUND
    ram = directory is not None and Path(directory).resolve().is_relative_to("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="optsched-bench-ckpt-", dir=directory))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            sides = {
                "optsched": _optsched_side(num_params, root / "optsched"),
                "optsched-size": _optsched_side(num_params, root / "optsched-size", verify="size"),
                "transformers": _transformers_side(num_params, root / "transformers"),
            }
        save_t: dict[str, list[float]] = {k: [] for k in sides}
        load_t = {regime: {k: [] for k in sides} for regime in REGIMES}
        paths: dict[str, Path] = {}
        order = list(sides)
        for r in range(warmup + rounds):
            with large_allocations(REUSED):  # a save runs mid-training, in a process that reuses memory
                for name in order:
                    # A new checkpoint-N each round; the side's previous one is deleted first, and the
                    # deletion finished by os.sync() before the clock starts (12 GB of old checkpoints
                    # would push the new ones out of the page cache and loads would read the disk).
                    sides[name][2](r + 1)
                    if name in paths:  # one checkpoint per side: older ones would crowd the page cache out
                        shutil.rmtree(paths[name])
                    os.sync()  # start each save with no dirty pages and the deletion done: neither is timed
                    box: list[Path] = []
                    seconds = time_once(lambda: box.append(sides[name][0]()))
                    paths[name] = box[0]
                    if r >= warmup:
                        save_t[name].append(seconds)
            # Untimed: every save's writeback done (the kernel's for both sides, and optsched's flush
            # thread) before any load, so that no load runs beside a 600 MB write to the disk.
            os.sync()
            for side in sides.values():
                side[3]()
            for regime in REGIMES:  # fresh memory (a resume), then memory reused (a loop of loads)
                # Reused: one pin around the loop. Fresh: a pin around each load, since entering it gives
                # the heap's free memory back, and what the previous load freed inside the heap would
                # otherwise serve this one warm (benchmarks._allocator).
                with large_allocations(regime) if regime == REUSED else contextlib.nullcontext() as loop_pin:
                    for _ in range(loads):  # loads are cheap next to saves: more samples against the noise
                        for name in order:
                            _into_page_cache(paths[name])  # untimed: both sides load from the page cache
                            with large_allocations(regime) if regime == FRESH else contextlib.nullcontext(
                                    loop_pin) as pinned:
                                seconds = time_once(lambda: sides[name][1](paths[name]))
                            if r >= warmup:
                                load_t[regime][name].append(seconds)
                        order.reverse()
            order.reverse()  # who goes first alternates: neither always gets the warmer cache
        _check_same_state(paths["optsched"], paths["transformers"])
        size = {name: directory_bytes(paths[name]) for name in sides}
        files = {name: sorted(f.name for f in paths[name].iterdir()) for name in sides}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = sum(p.numel() for p in build_model(num_params).parameters()) if quick else None
    label = f"{(n or num_params) / 1e6:.1f}M" if quick else f"{num_params / 1e6:.0f}M"
    label += " in RAM" if ram else ""
    rows = []
    memory = "" if pinned else " (malloc not pinned: no glibc)"
    # (what, timings, optsched side, how it is described, target): the load of a resume first
    measured = [
        ("save", save_t, "optsched", "", True),
        ("load", load_t[FRESH], "optsched", memory, True),
        ("load", load_t[FRESH], "optsched-size", f" (checkpoint_verification='size'){memory}", True),
        ("load", load_t[REUSED], "optsched", ", memory reused (a loop of loads)", False),
        ("load", load_t[REUSED], "optsched-size", " (checkpoint_verification='size'), memory reused", False),
    ]
    for what, times, side, note, target in measured:
        ours, ref = statistics.median(times[side]), statistics.median(times["transformers"])
        print(f"checkpoint {what}{note} {label}: ours {ours:.4g} s, reference {ref:.4g} s, ratio {ref / ours:.3g}",
              flush=True)
        rows.append(Row(4, f"checkpoint {what}{note} {label} + AdamW state", "s", ours, ref, "transformers Trainer",
                        None, ref / ours, "no slower (ratio >= 1)" if target else "", ref / ours >= 1.0 if target
                        else None, f"median of {len(times[side])}; rounds: ours " + " ".join(f"{t:.3f}" for t in times[side])
                        + ", reference " + " ".join(f"{t:.3f}" for t in times["transformers"])))
    ours_mb, ref_mb = size["optsched"] / 1e6, size["transformers"] / 1e6
    print(f"checkpoint bytes {label}: ours {ours_mb:.4g} MB, reference {ref_mb:.4g} MB, ratio {ref_mb / ours_mb:.3g}",
          flush=True)
    rows.append(Row(4, f"checkpoint size {label} + AdamW state", "MB", ours_mb, ref_mb, "transformers Trainer", None,
                    ref_mb / ours_mb, "no larger (ratio >= 1)", size["optsched"] <= size["transformers"],
                    f"optsched - transformers = {size['optsched'] - size['transformers']:+d} bytes; optsched files: "
                    f"{', '.join(files['optsched'])}; transformers: {', '.join(files['transformers'])}"))
    return rows


def run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
        directory: str | None = None) -> list[Row]:
    """Question 4 (see :func:`_run`), with log records and warnings silenced while it runs."""
    with quiet():
        return _run(quick, num_params=num_params, rounds=rounds, directory=directory)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (default 50e6)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: the temp dir; /dev/shm: in RAM)")
    opts = parser.parse_args(argv)
    return run(opts.quick, num_params=opts.params, rounds=opts.rounds, directory=opts.dir)


if __name__ == "__main__":
    main()
