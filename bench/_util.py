"""Helpers shared by the benchmarks (not part of the package)."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def median_seconds(fn, reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_line() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def mamba_ssm_ref():
    """mamba-ssm's pure-torch selective_scan_ref, importable on a CPU machine (see tests/conftest.py)."""
    import sys
    import types

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref
