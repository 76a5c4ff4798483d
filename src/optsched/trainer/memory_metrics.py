"""``skip_memory_metrics=False``: transformers' memory metrics of the Trainer's stages.

Each stage (``init``: the constructor; ``train``; ``eval``: :meth:`evaluate`; ``test``: :meth:`predict`)
reports, in bytes, as transformers' ``TrainerMemoryTracker`` names them:

* ``<stage>_mem_cpu_alloc_delta``: the process's resident memory (RSS) at the end minus at the start;
* ``<stage>_mem_cpu_peaked_delta``: the highest RSS during the stage minus the RSS at its end (so
  ``alloc + peaked`` is what the stage needed at its peak);
* on an accelerator with memory statistics (CUDA, XPU, NPU, MLU, MUSA, HPU),
  ``<stage>_mem_gpu_alloc_delta`` / ``_peaked_delta`` from ``memory_allocated()`` /
  ``max_memory_allocated()``.

The first stage reported also carries ``init``'s two (or four) and ``before_init_mem_cpu`` (``_gpu``),
the memory in use when the Trainer was made. An evaluation inside ``train()`` is part of the train stage.
The train metrics are logged; the eval and test ones are only returned, as in transformers.

Where optsched does better: the CPU peak is the kernel's own high-water mark (``VmHWM`` in
``/proc/self/status``, reset at each stage's start through ``/proc/self/clear_refs``), exact and free,
where transformers polls RSS in a busy loop on a thread that keeps a core at 100% for the whole stage
(half of a 2-core machine's training throughput). Without that file (not Linux, or not writable) a thread
samples RSS every millisecond (a peak shorter than that may be missed). Resetting the high-water mark also
resets what ``resource.getrusage().ru_maxrss`` reports for the process. Cost when enabled: a
``gc.collect()`` at each stage's start and end (0.2 s with transformers imported); nothing when skipped.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from typing import Any

import torch

from optsched.trainer.distributed import empty_device_cache

__all__ = ["MemoryTracker", "cpu_resident_bytes"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_STATM = "/proc/self/statm"
_HWM = re.compile(rb"VmHWM:\s+(\d+) kB")


def cpu_resident_bytes() -> int | None:
    """The process's resident memory in bytes (``/proc/self/statm``, else psutil), or None if unknown."""
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class _CpuPeak:
    """The highest RSS since :meth:`reset`: the kernel's VmHWM where it can be reset, else a sampling thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self._kernel = False

    def reset(self) -> None:
        self.close()
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # resets the peak resident set size to the current one (Linux >= 4.0)
            self._kernel = True
            return
        except OSError:
            self._kernel = False
        self._sampled = cpu_resident_bytes() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="optsched-memory-peak", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, cpu_resident_bytes() or 0)

    def read(self) -> int:
        if self._kernel:
            try:
                with open(_STATUS, "rb") as f:
                    found = _HWM.search(f.read())
                if found:
                    return int(found.group(1)) * 1024
            except OSError:
                pass
        return max(self._sampled, cpu_resident_bytes() or 0)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def _device_memory_module(device: torch.device) -> Any | None:
    """torch's module of ``device``'s kind when it keeps allocation statistics (``torch.cuda``, ...)."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    needed = ("memory_allocated", "max_memory_allocated", "reset_peak_memory_stats")
    return module if module is not None and all(callable(getattr(module, n, None)) for n in needed) else None


class MemoryTracker:
    """Measures one stage at a time (see the module docstring); does nothing when ``enabled`` is False.

    Args:
        enabled: ``not args.skip_memory_metrics``.
        device: the Trainer's device (its accelerator's statistics are read).
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled and cpu_resident_bytes() is not None
        self._device = device
        self._stats = _device_memory_module(device)
        self._stage: str | None = None
        self._peak = _CpuPeak()
        self._begin: dict[str, int] = {}
        self._done: dict[str, dict[str, Any]] = {}
        self._init_reported = False

    def start(self, stage: str) -> None:
        """Begin ``stage``; ignored while another stage runs (an evaluation inside ``train()``)."""
        if not self.enabled or self._stage is not None:
            return
        self._stage = stage
        gc.collect()
        if self._stats is not None:
            self._stats.reset_peak_memory_stats()
            empty_device_cache(self._device)
            self._begin["gpu"] = int(self._stats.memory_allocated())
        self._begin["cpu"] = cpu_resident_bytes() or 0
        self._peak.reset()

    def stop(self, stage: str, metrics: dict[str, Any] | None = None) -> None:
        """End ``stage`` (a call for another stage than the running one is ignored) and add the metrics of
        the stages not reported yet to ``metrics`` (``init``'s go with the first stage that reports)."""
        if not self.enabled or self._stage != stage:
            return
        peak = self._peak.read()
        self._peak.close()
        gc.collect()
        now = cpu_resident_bytes() or 0
        done = {"cpu_alloc": now - self._begin["cpu"], "cpu_peaked": max(0, peak - now),
                "cpu_begin": self._begin["cpu"]}
        if self._stats is not None:
            empty_device_cache(self._device)
            used = int(self._stats.memory_allocated())
            peak_used = int(self._stats.max_memory_allocated())
            done.update(gpu_alloc=used - self._begin["gpu"], gpu_peaked=max(0, peak_used - used),
                        gpu_begin=self._begin["gpu"])
        self._done[stage] = done
        self._stage = None
        if metrics is not None:
            self._report(stage, metrics)

    def abandon(self, stage: str) -> None:
        """Forget ``stage`` when it ended with an exception (its sampling thread, if any, is stopped); a call
        for another stage than the running one is ignored."""
        if self._stage == stage:
            self._peak.close()
            self._stage = None

    def _report(self, stage: str, metrics: dict[str, Any]) -> None:
        stages = [stage]
        if not self._init_reported and "init" in self._done:
            stages.insert(0, "init")
            self._init_reported = True
        for name in stages:
            done = self._done[name]
            for kind in ("alloc", "peaked"):
                metrics[f"{name}_mem_cpu_{kind}_delta"] = done[f"cpu_{kind}"]
                if f"gpu_{kind}" in done:
                    metrics[f"{name}_mem_gpu_{kind}_delta"] = done[f"gpu_{kind}"]
        if stages[0] == "init":
            metrics["before_init_mem_cpu"] = self._done["init"]["cpu_begin"]
            if "gpu_begin" in self._done["init"]:
                metrics["before_init_mem_gpu"] = self._done["init"]["gpu_begin"]
