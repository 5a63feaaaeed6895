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


class ResultCache:
    """One JSON record per measured run in a ``.jsonl`` file, keyed by the fields that define the run, so that an
    interrupted or extended benchmark (more seeds, more models) measures only what is missing."""

    def __init__(self, path):
        import json
        from pathlib import Path

        self.path = Path(path)
        self.records = [json.loads(line) for line in self.path.read_text().splitlines()
                        if line.strip()] if self.path.is_file() else []

    def get(self, **key):
        for r in self.records:
            if all(r.get(k) == v for k, v in key.items()):
                return r
        return None

    def add(self, record: dict) -> dict:
        import json

        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_spread(values) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def compare(ours: dict, theirs: dict) -> str:
    """Paired difference ``ours - theirs`` over the seeds both have, with the verdict used in every table: the
    difference counts only when its mean exceeds both the std of the paired differences and the larger of the two
    methods' own stds (with 3 seeds, anything smaller is indistinguishable from the calibration sample)."""
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return "-"
    diffs = [ours[s] - theirs[s] for s in seeds]
    m, s = mean_std(diffs)
    spread = max(s, mean_std(ours[k] for k in seeds)[1], mean_std(theirs[k] for k in seeds)[1])
    verdict = "within spread" if abs(m) <= spread else ("better" if m > 0 else "worse")
    return f"{m:+.2f} ± {s:.2f} ({verdict})"
