"""Peak resident memory of the process over a stretch of work (Linux ``/proc``; elsewhere it reads 0)."""
from __future__ import annotations

import threading

__all__ = ["PeakRSS"]


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
