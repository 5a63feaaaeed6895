"""PeakRSS accounting, in a fresh interpreter: a long test session's own allocations and reclaim would blur it."""
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import time

    from vmq_fx.pt2e.memory import PeakRSS

    with PeakRSS() as rss:
        buffer = b"\\x01" * (64 << 20)  # written, so resident (a zeroed allocation need not be)
        time.sleep(0.2)  # ten sampling periods
        del buffer  # freed before the block ends: only the sampler can have seen it
    print(rss.start, rss.peak)
    """
)


def test_peak_sees_a_buffer_freed_inside_the_block():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True).stdout
    start, peak = map(int, out.split())
    assert start > 0
    assert peak - start >= 56 << 20, f"peak grew by {(peak - start) >> 20} MiB for a 64 MiB buffer"
