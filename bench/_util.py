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


def test_set(limit: int | None = None):
    """Normalized Fashion-MNIST test images and labels (the first ``limit`` of them)."""
    from vmq_fx.data import fashion_mnist, normalize

    images, labels = fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return normalize(images), labels


def top1(logits, labels) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()
