"""benchmarks._allocator pins glibc's large-allocation regime (page faults tell the two apart)."""

import contextlib
import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._allocator import FRESH, REUSED, large_allocations  # noqa: E402

resource = pytest.importorskip("resource")

BLOCK = 16 << 20  # under glibc's 32 MiB ceiling for the mmap threshold: reusable when pinned so


def _faults_of_repeated_allocations(regime: str, rounds: int = 4) -> int:
    """Minor page faults of ``malloc``, touching and ``free`` of one 16 MiB block, ``rounds`` times after
    one uncounted round, in ``regime`` as the benchmarks pin it: fresh entered anew around each
    round (each measured operation), reused once around the whole loop (the C library's own malloc:
    torch's 64-byte aligned requests make glibc's heap grow a few times before a freed block fits the
    next one, which would blur the count)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def once() -> None:
        block = libc.malloc(BLOCK)
        assert block, "malloc failed"
        ctypes.memset(block, 1, BLOCK)
        libc.free(block)

    def pinned_once() -> None:
        if regime == FRESH:
            with large_allocations(regime):
                once()
        else:
            once()

    with large_allocations(regime) if regime == REUSED else contextlib.nullcontext():
        pinned_once()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            pinned_once()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_fresh_faults_every_block_in_and_reused_keeps_it():
    with large_allocations(FRESH) as pinned:
        if not pinned:
            pytest.skip("no glibc mallopt")
    fresh = _faults_of_repeated_allocations(FRESH)
    reused = _faults_of_repeated_allocations(REUSED)
    pages = 4 * BLOCK // 4096  # every page of every round, when each block is a fresh mapping
    assert fresh >= pages // 8  # transparent huge pages may fault 2 MiB at a time: still far above reused
    assert reused < fresh // 4, (fresh, reused)


def test_fresh_gives_back_a_free_chunk_left_inside_the_heap():
    """A block freed below a live one stays in glibc's heap, faulted in; without malloc_trim the fresh
    regime served the next large request from it (0 faults: this test failed in a CI run where an earlier
    test had left such a chunk)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    with large_allocations(REUSED) as pinned:
        if not pinned:
            pytest.skip("no glibc mallopt")
        chunk = libc.malloc(BLOCK + (4 << 20))
        ctypes.memset(chunk, 1, BLOCK + (4 << 20))
        live = libc.malloc(1 << 20)  # above the chunk: the chunk cannot go back with the heap's top
        ctypes.memset(live, 1, 1 << 20)
        libc.free(chunk)
    try:
        fresh = _faults_of_repeated_allocations(FRESH)
    finally:
        libc.free(live)
    assert fresh >= (4 * BLOCK // 4096) // 8


def test_an_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="regime='warm'.*fresh.*reused"):
        with large_allocations("warm"):
            pass
