"""PeakRSS accounting, in a fresh interpreter: a long test session's own allocations and reclaim would blur it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


# What the malloc scripts share: glibc's counters (mallinfo2) in a fresh interpreter; argv[1] is "apply" or "default".
_MALLINFO = textwrap.dedent(
    """
    import ctypes
    import sys

    import torch

    from vmq_fx.pt2e import memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    """
)


def _malloc_script(body: str, mode: str, **env) -> list[str]:
    """The printed words of ``_MALLINFO`` + ``body`` run in a fresh interpreter, without the caller's ``MALLOC_*``
    environment (plus ``env``)."""
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env}
    return subprocess.run([sys.executable, "-c", _MALLINFO + textwrap.dedent(body), mode], capture_output=True,
                          text=True, check=True, env=env).stdout.split()


_RETURN_SCRIPT = """
    applied = memory.return_freed_memory() if sys.argv[1] == "apply" else None
    torch.ones(4 << 20)  # 16 MiB, freed at once: glibc's own rule raises its threshold to 16 MiB
    before = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
    x = torch.ones(1 << 20)  # 4 MiB
    print(applied, libc.mallinfo2().hblkhd - before)
"""


def _mapped(mode: str, **env) -> tuple[str, int]:
    applied, mapped = _malloc_script(_RETURN_SCRIPT, mode, **env)
    return applied, int(mapped)


def test_return_freed_memory_maps_a_tensor_glibc_would_serve_from_its_heap():
    """After a 16 MiB tensor is freed, glibc serves a 4 MiB one from its heap (and keeps its memory when it is freed);
    with ``return_freed_memory`` called first, the 4 MiB tensor is mapped on its own (and unmapped when freed).
    ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's choice and is left to stand."""
    assert _mapped("default") == ("None", 0)
    applied, mapped = _mapped("apply")
    assert applied == "True" and mapped >= 4 << 20
    applied, mapped = _mapped("apply", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False" and mapped >= 4 << 20


_REUSE_SCRIPT = """
    applied = memory.reuse_freed_memory() if sys.argv[1] == "apply" else None
    before = libc.mallinfo2()
    xs = [torch.ones(5 << 20) for _ in range(5)]  # 5 x 20 MiB
    mapped = libc.mallinfo2().hblkhd - before.hblkhd  # bytes in blocks mapped on their own
    del xs
    # heap bytes the process still holds after the frees: 100 MiB free at the heap's top is past glibc's own trim
    # threshold (at most twice its 32 MiB mapping threshold)
    kept = libc.mallinfo2().arena - before.arena
    print(applied, mapped, kept)
"""


def _reused(mode: str, **env) -> tuple[str, int, int]:
    applied, mapped, kept = _malloc_script(_REUSE_SCRIPT, mode, **env)
    return applied, int(mapped), int(kept)


def test_reuse_freed_memory_keeps_a_freed_tensor_in_the_heap():
    """glibc maps a fresh process's 20 MiB tensors on their own and unmaps them when freed (the next ones page-fault
    their memory in again); with ``reuse_freed_memory`` called first they come from the heap, which keeps them after the
    free. ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's choice and left to
    stand."""
    applied, mapped, kept = _reused("default")
    assert applied == "None" and mapped >= 100 << 20 and kept < 1 << 20
    applied, mapped, kept = _reused("apply")
    assert applied == "True" and mapped == 0 and kept >= 100 << 20
    for variable in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        applied, mapped, _ = _reused("apply", **{variable: "131072"})
        assert applied == "False" and mapped >= 100 << 20, variable


_HUGE_PAGES_SCRIPT = textwrap.dedent(
    """
    import sys

    if sys.argv[1] == "after-a-tensor":
        import torch

        torch.ones(1)
    from vmq_fx.pt2e.memory import huge_pages_for_large_tensors

    print(huge_pages_for_large_tensors())
    """
)


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() or
                    "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="no transparent huge pages on this system")
def test_huge_pages_for_large_tensors_takes_only_before_torch_allocates():
    """Called first, torch's large tensors are advised for huge pages (whether the kernel finds free 2 MiB pages is
    its own affair); once torch has made a tensor it has read its setting, and the function says that it did not
    take. ``THP_MEM_ALLOC_ENABLE=0`` in the environment is the user's choice."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def run(mode, **extra):
        return subprocess.run([sys.executable, "-c", _HUGE_PAGES_SCRIPT, mode], capture_output=True, text=True,
                              check=True, env={**env, **extra}).stdout.strip()

    assert run("first") == "True"
    assert run("after-a-tensor") == "False"
    assert run("first", THP_MEM_ALLOC_ENABLE="0") == "False"
