"""The machine a benchmark ran on, its measured limits, and the row every figure is recorded in.

* :func:`describe_machine`: CPU model, cores, memory, OS, Python / torch versions, torch threads, GPU.
* :func:`bandwidth_kernels` / :func:`measure_bandwidth`: the memory bandwidth that streaming kernels
  reach on this machine, now::

      bandwidth = (bytes read + bytes written) / seconds

  over two kernels on tensors (256 MiB by default) far larger than any CPU cache:

  - ``copy``: ``dst.copy_(src)``, 2 x nbytes (STREAM's Copy). The CPU also reads each destination line
    before writing it (write-allocate), which is not counted, so copy under-states the bandwidth;
  - ``update``: ``a.add_(b)``, 3 x nbytes (read a, b; write a in place): the access pattern of an
    optimizer step, where every written line was just read, so nothing is uncounted.

  The limit (roofline) is the higher of the two. :func:`measure_bandwidth` (the machine description)
  takes each kernel's fastest round; ``benchmarks.optimizer_step`` runs the kernels in the same
  rounds as the steps they divide and compares medians with medians, because on a shared machine
  the available bandwidth changes with the load.
* :func:`measure_matmul_flops`: the matrix-multiply rate (``2 n^3 / t``, fastest round) in fp32 or
  bf16, the compute limit of compute-bound steps (Muon's Newton-Schulz iterations run in bf16).
* :class:`Row`: one figure: optsched vs reference vs limit, the ratio and the target.
* :func:`freeze_heap`: the heavy modules imported and kept out of the garbage collector's walks.
* :func:`quiet`: the benchmarks' run environment (no log warnings, no Python warnings), restored after.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._timing import timer_for

__all__ = [
    "Row", "bandwidth_kernels", "describe_machine", "freeze_heap", "in_new_process", "measure_bandwidth", "measure_matmul_flops", "quiet",
]

MiB = 1 << 20


@dataclass
class Row:
    """One figure of the benchmark report.

    Attributes:
        question: the issue's question number (1 to 5).
        name: what was measured (``"AdamW step 50M (default vs torch fused)"``).
        unit: unit of ``ours`` / ``reference`` / ``limit`` (``"ms"``, ``"s"``, ``"MB"``, ``"steps/s"``).
        ours: optsched's value.
        reference: the reference's value (``None``: no reference for this figure).
        reference_name: what the reference is (``"torch AdamW fused=True"``).
        limit: the machine's limit in the same unit (roofline time), or ``None``.
        ratio: how optsched compares, ``> 1`` better (time: reference / ours; size: reference / ours).
        target: the issue's target in words (``"ratio >= 0.95"``), or ``""``.
        met: whether the target is met (``None``: no target).
        note: anything the reader needs (formula of the bytes, the roofline fraction, caveats).
    """

    question: int
    name: str
    unit: str
    ours: float
    reference: float | None = None
    reference_name: str = ""
    limit: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence log records below ERROR, Python warnings and transformers' logger; restore all three after.

    A warning printed per round would be timed with it; restoring matters because the smoke test runs
    the benchmarks inside pytest, where other tests check warnings and log records.
    """
    level = logging.root.manager.disable
    hf_logging = sys.modules.get("transformers.utils.logging")
    hf_level = hf_logging.get_verbosity() if hf_logging is not None else None
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_level if hf_level is not None else hf_logging.WARNING)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's answer is the best there is
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cache_sizes() -> str:
    base = "/sys/devices/system/cpu/cpu0/cache"
    parts = []
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/level", encoding="utf-8") as f:
                level = f.read().strip()
            with open(f"{base}/{entry}/type", encoding="utf-8") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size", encoding="utf-8") as f:
                size = f.read().strip()
            if kind != "Instruction":
                parts.append(f"L{level} {size}")
    except OSError:
        return ""
    return ", ".join(parts)


def in_new_process(module: str, argv: list[str], *, show: bool = True) -> str:
    """Run ``python -m benchmarks.<module> *argv`` in a new process; return its output (and show it).

    For measurements whose speed depends on glibc's allocator (``benchmarks._allocator``) or on the
    first touches of a process's memory: a new process starts with glibc as a training process does,
    and a regime pinned there ends with it (in this process a pin would last: glibc's threshold never
    moves by itself again once set).

    Raises:
        RuntimeError: the script failed (its exit status and the end of its error output).
    """
    command = [sys.executable, "-m", f"benchmarks.{module}", *argv]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          check=False)
    if show:
        print(done.stdout, end="", flush=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def describe_machine() -> dict[str, str]:
    """What the figures were measured on, as ``label -> value`` (strings, for the report)."""
    memory = _memory_bytes()
    gpu = (
        f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        if torch.cuda.is_available()
        else "none (CUDA figures: BENCHMARKS-cuda.md)"
    )
    return {
        "CPU": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "CPU caches (per core / shared)": _cache_sizes() or "unknown",
        "memory": f"{memory / 2**30:.1f} GiB" if memory else "unknown",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "GPU": gpu,
    }


def bandwidth_kernels(nbytes: int = 256 * MiB, device: str | torch.device = "cpu"
                      ) -> dict[str, tuple[Callable[[], object], int]]:
    """The streaming kernels as ``name -> (call, bytes it reads + writes)``, tensors already touched.

    On a GPU both count exactly what they move (no write-allocate), so they agree to a few percent;
    time them with ``benchmarks._timing.timer_for(device)``.

    Raises:
        ValueError: ``nbytes`` < 4.
    """
    if nbytes < 4:
        raise ValueError(f"nbytes={nbytes!r}; accepted: nbytes >= 4.")
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    acc = torch.zeros(n, dtype=torch.float32, device=device)
    acc.add_(src)
    return {"copy": (lambda: dst.copy_(src), 2 * n * 4), "update": (lambda: acc.add_(src), 3 * n * 4)}


def measure_bandwidth(nbytes: int = 256 * MiB, rounds: int = 7, device: str | torch.device = "cpu") -> float:
    """Memory bandwidth in bytes/s: the best of the :func:`bandwidth_kernels`, each at its fastest round.

    Args:
        nbytes: size of each tensor; keep it well above the last-level cache (quick runs may pass
            less and get a cache figure).
        rounds: timed calls of each kernel (alternating).

    Raises:
        ValueError: ``nbytes`` < 4 or ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r}; accepted: rounds >= 1.")
    kernels = bandwidth_kernels(nbytes, device)
    timer = timer_for(device)
    best = {name: math.inf for name in kernels}
    for _ in range(rounds):
        for name, (fn, _) in kernels.items():
            best[name] = min(best[name], timer(fn))
    return max(kernels[name][1] / seconds for name, seconds in best.items())


def measure_matmul_flops(n: int = 1024, rounds: int = 5, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> float:
    """Matrix-multiply rate in FLOP/s: ``2 n^3 / fastest(seconds of a @ b)`` for ``n x n`` matrices of ``dtype``.

    Raises:
        ValueError: ``n`` < 1 or ``rounds`` < 1.
    """
    if n < 1 or rounds < 1:
        raise ValueError(f"n={n!r}, rounds={rounds!r}; accepted: n >= 1, rounds >= 1.")
    a = torch.randn(n, n, dtype=dtype, device=device)  # random, not zeros: a GPU multiplies zeros faster
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    timer = timer_for(device)
    product = lambda: torch.mm(a, b, out=out)  # noqa: E731 - one callable: a CudaTimer keys its spin on it
    seconds = min(timer(product) for _ in range(rounds))
    return 2 * n**3 / seconds


def freeze_heap() -> None:
    """Import the heavy modules now and move every object they made out of the garbage collector's reach.

    ``_timing.time_once`` runs ``gc.collect()`` before each timed call; with transformers imported that
    walks ~370k objects (0.2 to 0.6 s here), which dominates the quick mode. ``gc.freeze()`` keeps those
    long-lived objects out of later collections; objects the benchmarks create are still collected.
    """
    import gc

    with contextlib.suppress(ImportError):  # transformers is only needed by the reference sides
        import transformers  # noqa: F401
        import transformers.trainer  # noqa: F401
    import optsched.optim  # noqa: F401
    import optsched.trainer  # noqa: F401

    gc.collect()
    gc.freeze()
