"""Time two implementations alternately in one process and report medians and their ratio.

Shared by every benchmark script. Alternating A and B (A B A B ...) spreads machine noise (other
processes, frequency scaling, caches) over both evenly; the median over rounds discards outliers.

Usage::

    from benchmarks._timing import compare, report

    result = compare(lambda: ours(model), lambda: reference(model), rounds=5)
    report("groups 10k", result)   # groups 10k: ours 0.0123 s, reference 0.456 s, ratio 37.1
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Comparison", "CudaTimer", "compare", "report", "round_robin", "time_once", "timer_for"]


@dataclass(frozen=True)
class Comparison:
    """Timings of ``ours`` and ``reference`` over the same rounds, in seconds.

    Attributes:
        ours: median seconds of ``ours``.
        reference: median seconds of ``reference`` (``nan`` when it was not run).
        ratio: ``reference / ours``: above 1 means ours is faster.
        ours_all / reference_all: every round's time, in run order.
    """

    ours: float
    reference: float
    ours_all: list[float] = field(default_factory=list)
    reference_all: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.reference / self.ours if self.ours > 0 else float("inf")


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, with garbage collection run before and paused during it."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


class CudaTimer:
    """Seconds of GPU time one call of ``fn`` takes, read from CUDA events recorded around it.

    The queue is drained first (``torch.cuda.synchronize()``), then the GPU is kept busy by a spin kernel
    (``torch.cuda._sleep``) while the host queues ``fn``'s kernels, so the span between the events is
    the kernels themselves, as in a training loop where the host runs ahead of the GPU. Where the host
    is slower than the kernels (a for-loop optimizer's thousands of launches), the GPU waits for it
    inside the span and the span is the host's time: launch-bound work is timed as launch-bound.

    The spin lasts 1.5x the host time of ``fn``, measured once, the first time ``fn`` is timed, by an extra
    call on an idle GPU (from the call to its return; ``host[fn]``). It is not measured behind the spin:
    there a host that fills CUDA's launch queue, or that synchronises inside ``fn`` (an optimizer reading a
    value back), waits for the spin, and a spin sized from that wait grew call after call (seen on an H100:
    20 ms to 14 s in 15 rounds). Garbage collection as in :func:`time_once`.
    """

    def __init__(self) -> None:
        import torch

        self.host: dict[Callable[[], Any], float] = {}
        torch.cuda.synchronize()
        cycles = 50_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # wake the clock up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        self.cycles_per_second = cycles / (start.elapsed_time(end) / 1e3)

    def __call__(self, fn: Callable[[], Any]) -> float:
        import torch

        if fn not in self.host:
            torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            self.host[fn] = time.perf_counter() - began
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spin = 1.5 * self.host[fn] + 2e-4
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            torch.cuda._sleep(int(spin * self.cycles_per_second))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
        finally:
            if enabled:
                gc.enable()


def timer_for(device: Any) -> Callable[[Callable[[], Any]], float]:
    """A :class:`CudaTimer` for a CUDA device (a ``torch.device`` or its name), else :func:`time_once`."""
    return CudaTimer() if str(device).startswith("cuda") else time_once


def compare(
    ours: Callable[[], Any],
    reference: Callable[[], Any] | None,
    *,
    rounds: int = 5,
    warmup: int = 1,
    reference_rounds: int | None = None,
) -> Comparison:
    """Run ``ours`` and ``reference`` alternately and return the medians.

    Args:
        ours: the optsched side, called with no arguments.
        reference: the reference side (transformers, torch, ...), or ``None`` to time ours only.
        rounds: timed rounds of ``ours``.
        warmup: untimed calls of each before timing (imports, allocator, caches).
        reference_rounds: timed rounds of ``reference`` (default ``rounds``); use fewer for a slow
            reference. The two still alternate while both have rounds left.

    Raises:
        ValueError: ``rounds`` < 1, ``warmup`` < 0 or ``reference_rounds`` < 1.
    """
    ref_rounds = rounds if reference_rounds is None else reference_rounds
    if rounds < 1 or warmup < 0 or ref_rounds < 1:
        raise ValueError(
            f"rounds={rounds!r}, warmup={warmup!r}, reference_rounds={reference_rounds!r}; accepted: "
            "rounds >= 1, warmup >= 0, reference_rounds >= 1 or None."
        )
    for _ in range(warmup):
        ours()
        if reference is not None:
            reference()
    ours_times: list[float] = []
    ref_times: list[float] = []
    for i in range(max(rounds, ref_rounds if reference is not None else 0)):
        if i < rounds:
            ours_times.append(time_once(ours))
        if reference is not None and i < ref_rounds:
            ref_times.append(time_once(reference))
    return Comparison(
        ours=statistics.median(ours_times),
        reference=statistics.median(ref_times) if ref_times else float("nan"),
        ours_all=ours_times,
        reference_all=ref_times,
    )


def report(name: str, result: Comparison) -> str:
    """Print and return ``name: ours X s, reference Y s, ratio Z``."""
    line = f"{name}: ours {result.ours:.4g} s, reference {result.reference:.4g} s, ratio {result.ratio:.3g}"
    print(line, flush=True)
    return line


def round_robin(
    contestants: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1, seed: int = 0,
    timer: Callable[[Callable[[], object]], float] = time_once,
) -> dict[str, list[float]]:
    """Seconds of each contestant per round, each called once per round, as ``_timing.compare`` does for two.

    The warm-up runs in the given order; every timed round runs in a fresh random order (seeded), so
    that no contestant always runs first, or right after the same other one (a fixed or rotated
    order keeps the same neighbours, whose cache footprint each would inherit every round).
    """
    names = list(contestants)
    order = random.Random(seed)
    for _ in range(warmup):
        for fn in contestants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            times[name].append(timer(contestants[name]))
    return times
