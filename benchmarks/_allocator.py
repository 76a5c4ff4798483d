"""Pin how glibc's ``malloc`` serves large allocations, so that a benchmark says which regime it measured.

glibc serves an allocation of ``M_MMAP_THRESHOLD`` bytes or more with a fresh ``mmap``, whose pages the
kernel faults in and zeroes on first touch, and smaller ones from its heap, which keeps freed memory
for the next allocation. The threshold moves by itself: it starts at 128 KiB and rises to the size of
each mmapped block that is freed (up to 32 MiB on 64-bit), and the heap's free top is given back to
the kernel above ``M_TRIM_THRESHOLD`` (twice the threshold). So the same code runs in one regime or
the other depending on what ran before it in the process, and on this VM the two differ by 2-4x for
code that allocates hundreds of MB:

* :data:`FRESH`: every large block comes fresh from the kernel: the threshold is pinned at glibc's
  initial 128 KiB, and entering the regime gives the heap's free memory back (``malloc_trim(0)``). A
  chunk freed in the middle of the heap, below a live block, stays in glibc's bins and serves the next
  large request of its size before any new mapping; its pages are released on entry, so they fault in
  again, but once used and freed inside the regime they are warm. Enter the regime right before each
  measured operation. This is what loading a checkpoint costs when training resumes: the process has never
  held the optimizer state before, so nothing freed is there to reuse.
* :data:`REUSED`: blocks up to 32 MiB come from the heap and freed memory is kept (threshold pinned
  at its maximum, no trimming). This is a loop that frees and allocates the same sizes over and
  over, as a benchmark's repeated loads do, and as transformers' ``Adafactor`` does once glibc's
  threshold has risen (it allocates four matrix-sized temporaries per parameter per step).

A pin lasts for the rest of the process: glibc has no call that makes its threshold move by itself
again, so on leaving :func:`large_allocations` it stays fixed at 128 KiB (every large block fresh).
``python -m benchmarks`` therefore runs pinned measurements in a new process
(``benchmarks._machine.in_new_process``) or after every other question.

Elsewhere (musl, macOS, Windows) there is no ``mallopt`` and nothing is pinned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Iterator

__all__ = ["FRESH", "REGIMES", "REUSED", "large_allocations"]

FRESH, REUSED = "fresh", "reused"
REGIMES = (FRESH, REUSED)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_INITIAL = 128 * 1024  # glibc's initial mmap and trim thresholds
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
_NEVER_TRIM = 1 << 62
_SETTINGS = {FRESH: (_INITIAL, _INITIAL), REUSED: (_MAX_MMAP_THRESHOLD, _NEVER_TRIM)}


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (free memory at the heap's top and inside it back to the kernel), or a
    no-op where the C library has none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(param, value) -> 1 on success``, or ``None`` where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return lambda param, value: mallopt(param, min(value, 2**31 - 1))  # an int in C


@contextlib.contextmanager
def large_allocations(regime: str) -> Iterator[bool]:
    """Serve large allocations in ``regime`` (:data:`FRESH` or :data:`REUSED`) inside the ``with``.

    Yields whether the regime is pinned (``False`` without glibc's ``mallopt``). On exit both
    thresholds go back to glibc's initial 128 KiB, but stay fixed: glibc has no call that makes the
    threshold move by itself again.

    Raises:
        ValueError: an unknown ``regime``.
    """
    if regime not in _SETTINGS:
        raise ValueError(f"regime={regime!r} is not one of {REGIMES}")
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    mmap_threshold, trim_threshold = _SETTINGS[regime]
    pinned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if regime == FRESH:
        _malloc_trim()()
    try:
        yield pinned
    finally:
        mallopt(_M_MMAP_THRESHOLD, _INITIAL)
        mallopt(_M_TRIM_THRESHOLD, _INITIAL)
