"""Peak resident memory of the process over a stretch of work (Linux ``/proc``; elsewhere it reads 0)."""
from __future__ import annotations

import threading

__all__ = ["PeakRSS"]


class PeakRSS:
    """Samples the process's resident memory (``/proc/self/statm``) every 20 ms while active: ``peak`` and ``start``
    in bytes.

    Example:
        >>> with PeakRSS() as rss:
        ...     buffer = b"\x01" * (50 << 20)  # written, so resident (a zeroed allocation may not be)
        >>> rss.peak - rss.start >= 45 << 20
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
