"""Memory of the process: its peak over a stretch of work (Linux ``/proc``; elsewhere it reads 0), and the
allocator settings that keep the block-wise methods' peak down and their page faults few, or inference's page faults
away."""
from __future__ import annotations

import ctypes
import logging
import os
import threading

__all__ = ["PeakRSS", "huge_pages_for_large_tensors", "return_freed_memory", "reuse_freed_memory"]

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOPT_ENV = {_M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", _M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_"}


def _mallopt(settings: dict[int, int]) -> bool:
    """Set glibc malloc parameters ``{mallopt number: value}``; whether every one was set. None is set where the
    environment sets one of them, or the C library is not glibc's."""
    if any(os.environ.get(_MALLOPT_ENV[param]) for param in settings):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's alone: mallopt's parameter numbers are glibc's
        return all(libc.mallopt(param, int(value)) == 1 for param, value in settings.items())
    except (OSError, AttributeError):
        return False


def return_freed_memory(threshold: int = 128 << 10) -> bool:
    """Have glibc's ``malloc`` map each allocation of ``threshold`` bytes or more on its own rather than grow its
    heap for it, so that a tensor's memory goes back to the system when it is freed; the vmq CLI does this before
    quantizing.

    Why: glibc raises its mapping threshold each time it frees a mapped block, up to 32 MiB, and from then on grows
    its heap for smaller tensors; freed heap blocks stay with the process and leave holes that the next, larger
    activations cannot reuse. JLSS's forward and backward on a whole share of images allocate and free tens of such
    tensors per step, so the process's peak grows past what it holds at any moment, the more so the smaller each
    process's share. Measured in ``bench/results/distributed_calibration.md``.

    It is process-wide and stays on. ``MALLOC_MMAP_THRESHOLD_`` set in the environment (the same setting, read by
    glibc at start-up) is left to stand, and another C library is left alone.

    Returns:
        whether the threshold was set here.
    """
    done = _mallopt({_M_MMAP_THRESHOLD: threshold})
    log.debug("malloc: %s", f"allocations of {threshold} bytes or more are mapped one by one" if done
              else "left as it is")
    return done


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Have glibc's ``malloc`` keep freed memory in the process and serve the next tensors from it: for inference,
    where every forward allocates and frees the same activations; ``vmq bench``, ``vmq eval`` and the speed
    benchmarks do this. The opposite of :func:`return_freed_memory` (which the CLI uses while quantizing, for a lower
    peak).

    Why: by default glibc maps a block above its (moving) threshold on its own and unmaps it when freed, and gives the
    top of its heap back to the system once more than twice that threshold is free there; the next allocation of that
    memory page-faults it in again, 4 KiB at a time, zeroed. A Vim block's activations at batch 8 are 1-5 MiB each, and
    whether they churn depends on the order of earlier allocations: the lowered W8A8 vim_tiny at batch 8 ran 248-253 ms
    in one process (148 ``brk`` calls growing and shrinking the heap in one forward, ``strace``) and 174-180 ms with
    this setting, FP32 250 ms either way (Intel Xeon, one thread). Blocks of ``mmap_threshold`` (at most 32 MiB) or
    more are still mapped on their own; below it the heap keeps up to ``trim_threshold`` bytes of free memory at its
    top.

    It is process-wide and stays on; the process keeps its peak heap. ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` set in the environment (the same settings, read by glibc at start-up) are left to stand,
    and another C library is left alone. Set, they should be both: either alone fixes glibc's moving thresholds at
    their small start values, which made FP32 vim_tiny slower still (277-405 ms at batch 8).

    Returns:
        whether the settings were made here.
    """
    done = _mallopt({_M_MMAP_THRESHOLD: mmap_threshold, _M_TRIM_THRESHOLD: trim_threshold})
    log.debug("malloc: %s", f"freed memory kept for reuse (blocks below {mmap_threshold} bytes from the heap, up to "
                            f"{trim_threshold} bytes of it kept free)" if done else "left as it is")
    return done


def _advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding ``address`` carries ``MADV_HUGEPAGE`` (``hg`` in its ``VmFlags``, Linux)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                    start, end = (int(v, 16) for v in head.split("-"))
                    inside = start <= address < end
                elif inside and line.startswith("VmFlags:"):
                    return "hg" in line.split()[1:]
    except (OSError, ValueError):
        pass
    return False


def huge_pages_for_large_tensors() -> bool:
    """Have torch ask the kernel for transparent huge pages for each CPU tensor of 2 MiB or more
    (``THP_MEM_ALLOC_ENABLE=1``, which torch reads at its first allocation: call this before any tensor is made); the
    vmq CLI does this before quantizing.

    Why: each first touch of a page of a new tensor is a page fault; a 2 MiB page takes one where 4 KiB pages take
    512, and it spares TLB misses besides. JLSS allocates its activations anew at every step (more so after
    :func:`return_freed_memory`, which maps every large tensor afresh). Measured in
    ``bench/results/distributed_calibration.md``.

    ``THP_MEM_ALLOC_ENABLE`` set in the environment is the user's choice and is left to stand.

    Returns:
        whether a probe tensor of 4 MiB is advised for huge pages: ``False`` where torch had allocated before, the
        kernel's transparent huge pages are off (``never``), or the system is not Linux.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            available = "[never]" not in f.read()
    except OSError:
        available = False
    probe = torch.empty(4 << 20, dtype=torch.uint8)
    done = available and _advised_for_huge_pages(probe.data_ptr())
    log.debug("transparent huge pages for tensors of 2 MiB or more: %s", "asked for" if done else "not in use")
    return done


class PeakRSS:
    """Samples the process's resident memory (``/proc/self/statm``) every 20 ms while active: ``peak`` and ``start``
    in bytes.

    The numbers are the whole process's, so they move with everything else it does: the kernel reclaiming or
    swapping out cold pages, the garbage collector freeing memory mid-way. Read them as the cost of a stretch of work
    only when that work dominates (``tests/test_memory.py`` checks the accounting in a fresh process).

    Example:
        >>> with PeakRSS() as rss:
        ...     buffer = b"\x01" * (8 << 20)
        >>> rss.peak >= rss.start > 0
        True
    """

    def __init__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._page = 4096
        try:
            import os

            self._page = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: no sampling
            return 0

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
