"""Question: how many optimizer steps per second does optsched's Trainer run, next to a hand-written
PyTorch loop and transformers' Trainer, on the same tiny model and data?

All three train optsched's demo model (``optsched.demo``) on the same synthetic data with the same
set-up: fused AdamW (decay on matrices, none on biases / LayerNorm), linear schedule with 10% warmup,
gradient clipping at 1.0, batch 8, a loss read back every ``--logging-steps`` steps, no checkpoints,
no progress bar. Each runs once per round, in a fresh random order each round, for several rounds in
one process; each round times ``train()`` only (the hand loop: building the optimizer and scheduler
plus the loop), and the medians are reported:

    trainer overhead: optsched X steps/s, hand loop Y steps/s, transformers Z steps/s, ratio optsched/hand R

Goal: optsched >= 0.90 of the hand loop (transformers reaches about 0.55-0.60 here).

On a GPU (``--device cuda``, run by ``benchmarks.cuda``) the model lives there, batches are copied from
pinned memory, and ``--bf16`` runs every forward under bf16 autocast (the hand loop through
``torch.autocast``, the Trainers through ``bf16=True``). As on the CPU, the hand loop reads the loss
back every ``--logging-steps`` steps only and checks nothing for NaN / inf: it synchronises with the
GPU less often than either Trainer (optsched's non-finite guard and transformers'
``logging_nan_inf_filter`` read a value back every step), so it is the lower bound of the overhead.

Run:  python benchmarks/trainer_overhead.py [--steps 200] [--rounds 9] [--profile] [--device cuda] [--bf16]
``--profile`` also prints where optsched's ``train()`` spends its time (cProfile, top functions).
``--without-guard`` adds a fourth contestant, optsched's Trainer with its non-finite guard taken out (the
guard reads the loss and the gradient norm back every step: on a GPU, a wait for the queue), to measure
what the guard costs. ``--sync-profile`` prints, per step of the hand loop and of optsched's Trainer, the
operations dispatched, the kernels launched and the calls that wait for the GPU (torch's sync debug
mode; the last two on a GPU only).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._timing import round_robin, time_once  # noqa: E402 - the shared timers
from optsched.demo import build_dataset, build_model  # noqa: E402

LR = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
# All three use torch's fused AdamW kernel (both trainers via optim="adamw_torch_fused", their default
# from torch 2.8 on), so the comparison measures the loop around the optimizer, not the optimizer:
# torch's default single-tensor AdamW on CPU alone costs ~25% of a step here.
FUSED = True


def cpu_time_once(fn: Callable[[], object]) -> float:
    """CPU seconds of this process for one call: on a shared machine this leaves out the time other
    processes hold the cores (wall time does not). Meaningful with ``--threads 1``."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model()


def hand_loop(dataset, steps: int, batch_size: int, logging_steps: int, device: str = "cpu",
              bf16: bool = False) -> Callable[[], None]:
    """The reference: the loop a user writes by hand, with the same semantics as the Trainers."""
    on_gpu = torch.device(device).type != "cpu"

    def train() -> None:
        model = _model().to(device)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
            fused=FUSED,
        )
        warmup = math.ceil(WARMUP_RATIO * steps)

        def linear(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (steps - step) / max(1, steps - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, pin_memory=on_gpu,
                            generator=torch.Generator().manual_seed(0))
        params = [p for p in model.parameters() if p.requires_grad]
        step = 0
        while step < steps:
            for batch in loader:
                if on_gpu:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % logging_steps == 0:
                    loss.item()  # what logging costs: one sync to read the loss
                if step == steps:
                    break

    return train


def _unguarded_trainer() -> type:
    """optsched's Trainer without its non-finite guard (a diagnostic, not a configuration users have):
    ``_clip_and_step`` consults the guard only when ``train()`` has set ``_nonfinite``."""
    from optsched import Trainer

    class UnguardedTrainer(Trainer):
        @property
        def _nonfinite(self):
            raise AttributeError("_nonfinite")  # hasattr() is False: no read-back, no skip

        @_nonfinite.setter
        def _nonfinite(self, guard) -> None:
            pass

    return UnguardedTrainer


def optsched_trainer(dataset, steps: int, batch_size: int, logging_steps: int, out: str, device: str = "cpu",
                     bf16: bool = False, guard: bool = True) -> Callable[[], None]:
    from optsched import Trainer, TrainingArguments

    trainer_class = Trainer if guard else _unguarded_trainer()

    def make():
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=LR,
            weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", warmup_ratio=WARMUP_RATIO,
            max_grad_norm=MAX_GRAD_NORM, logging_steps=logging_steps, save_strategy="no", disable_tqdm=True,
            use_cpu=torch.device(device).type == "cpu", bf16=bf16, seed=0, optim="adamw_torch_fused",
        )
        trainer = trainer_class(model=_model(), args=args, train_dataset=dataset)
        if not trainer.optimizer.defaults.get("fused"):
            raise RuntimeError("optsched's AdamW is not the fused kernel here: the comparison would be unfair")
        return trainer

    return make


def transformers_trainer(dataset, steps: int, batch_size: int, logging_steps: int, out: str, device: str = "cpu",
                         bf16: bool = False) -> Callable[[], None]:
    import transformers

    transformers.logging.set_verbosity_error()

    def make():
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=LR,
            optim="adamw_torch_fused",
            weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", warmup_steps=WARMUP_RATIO,  # < 1: a ratio
            max_grad_norm=MAX_GRAD_NORM, logging_steps=logging_steps, save_strategy="no", disable_tqdm=True,
            use_cpu=torch.device(device).type == "cpu", bf16=bf16, seed=0, report_to="none",
        )
        return transformers.Trainer(model=_model(), args=args, train_dataset=dataset)

    return make


def per_step_counts(run: Callable[[], object], steps: int, on_gpu: bool) -> dict[str, float]:
    """Per step of one ``run()`` of ``steps`` steps: operators dispatched (torch.profiler's ``aten::`` events)
    and, on a GPU, kernels launched and calls that wait for the GPU (a read-back such as ``.item()``, a
    copy from pageable memory, an explicit synchronize: what ``torch.cuda.set_sync_debug_mode("warn")``
    reports, counted in the same run as the profile).

    A wait costs the GPU time queued before it; the hand loop waits once per ``--logging-steps`` steps.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if on_gpu:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            if on_gpu:
                torch.cuda.set_sync_debug_mode("default")
    events = prof.key_averages()
    counts = {"ops": sum(e.count for e in events if e.key.startswith("aten::")) / steps}
    if on_gpu:
        launches = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
        counts["kernel launches"] = sum(e.count for e in events if e.key in launches) / steps
        counts["waits for the GPU"] = sum("synchroniz" in str(w.message) for w in caught) / steps
    return counts


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="small batches expose per-step overhead (at 8, transformers runs at ~0.6 of the hand loop)")
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy machine)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where all three train")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in all three")
    parser.add_argument("--profile", action="store_true", help="profile one optsched train() afterwards")
    parser.add_argument("--without-guard", action="store_true",
                        help="also time optsched's Trainer without its non-finite guard (what the guard costs)")
    parser.add_argument("--sync-profile", action="store_true",
                        help="print ops, kernel launches and GPU waits per step of the hand loop and optsched's")
    opts = parser.parse_args(argv)

    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)  # a warning per run would be timed too
    warnings.filterwarnings("ignore")
    on_gpu = torch.device(opts.device).type != "cpu"
    if not on_gpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    elif opts.clock == "cpu":
        parser.error("--clock cpu measures this process's CPU time: with --device cuda the GPU's time would be missed")
    dataset = build_dataset(2048, seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="optsched-bench-")  # removed when main returns
    out = scratch.name

    timer = time_once if opts.clock == "wall" else cpu_time_once
    if on_gpu:  # train() returns with kernels queued: their time belongs to the run
        timer = lambda fn: time_once(lambda: (fn(), torch.cuda.synchronize()))  # noqa: E731
    runners: dict[str, Callable[[], float]] = {}
    setup = {"device": opts.device, "bf16": opts.bf16}
    hand = hand_loop(dataset, opts.steps, opts.batch_size, opts.logging_steps, **setup)
    runners["hand"] = lambda: timer(hand)
    ours = optsched_trainer(dataset, opts.steps, opts.batch_size, opts.logging_steps, out, **setup)

    def run_trainer(make: Callable[[], object]) -> float:
        trainer = make()  # construction (model, arguments) is not timed; train() is
        with contextlib.redirect_stdout(io.StringIO()):  # transformers prints its logs without tqdm
            seconds = timer(trainer.train)
        if trainer.state.global_step != opts.steps:
            raise RuntimeError(f"{type(trainer).__module__} ran {trainer.state.global_step} steps, not {opts.steps}")
        return seconds

    runners["optsched"] = lambda: run_trainer(ours)
    if not opts.skip_transformers:
        theirs = transformers_trainer(dataset, opts.steps, opts.batch_size, opts.logging_steps, out, **setup)
        runners["transformers"] = lambda: run_trainer(theirs)
    if opts.without_guard:
        unguarded = optsched_trainer(dataset, opts.steps, opts.batch_size, opts.logging_steps, out, **setup,
                                     guard=False)
        runners["optsched without guard"] = lambda: run_trainer(unguarded)

    # Warm-up (imports, allocator, first-call caches) in this order, then each round in a fresh random order.
    times = round_robin(runners, rounds=opts.rounds, timer=lambda run: run())  # each runner times itself
    rate = {name: opts.steps / statistics.median(ts) for name, ts in times.items()}
    line = (f"trainer overhead: optsched {rate['optsched']:.0f} steps/s, hand loop {rate['hand']:.0f} steps/s, "
            f"transformers {rate.get('transformers', float('nan')):.0f} steps/s, "
            f"ratio optsched/hand {rate['optsched'] / rate['hand']:.2f}")
    if "transformers" in rate:
        line += f", ratio transformers/hand {rate['transformers'] / rate['hand']:.2f}"
    if "optsched without guard" in rate:
        line += f", ratio optsched without guard/hand {rate['optsched without guard'] / rate['hand']:.2f}"
    print(line, flush=True)
    print(f"  ({opts.steps} steps x {opts.rounds} rounds, batch {opts.batch_size}, {opts.threads} thread(s), "
          f"{opts.device}{', bf16 autocast' if opts.bf16 else ''}, "
          f"{opts.clock} clock; "
          + "; ".join(f"{name}: " + " ".join(f"{t:.3f}" for t in ts) + " s" for name, ts in times.items()) + ")")

    if opts.sync_profile:
        for name, run in (("hand loop", hand), ("optsched", lambda: ours().train())):
            print(f"  {name}: " + ", ".join(f"{v:.1f} {k}" for k, v in per_step_counts(run, opts.steps, on_gpu).items())
                  + " per step", flush=True)

    if opts.profile:
        trainer = ours()
        profiler = cProfile.Profile()
        profiler.runcall(trainer.train)
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(30)
        print(buffer.getvalue())
    return rate


if __name__ == "__main__":
    main()
