"""Helpers shared by the benchmarks (not part of the package)."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def launch_command(procs: int, args: list[str]) -> list[str]:
    """The command that runs ``python ARGS`` as one process, or as ``procs`` processes under ``torchrun``."""
    import sys

    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]


def median_seconds(fn, reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(variants: dict, reps: int, rounds: int = 3, around: dict | None = None) -> dict[str, float]:
    """Median seconds per variant: ``rounds`` rounds, each timing every variant ``reps`` times in turn. ``around``:
    per variant, a context manager factory entered around each block of its runs and not timed (say, switching to the
    kernel build it runs on, which re-registers the dispatcher's kernels)."""
    times = {k: [] for k in variants}

    def block(k):
        return (around or {}).get(k, contextlib.nullcontext)()

    for k, fn in variants.items():  # warm-up (and build caches) once
        with block(k):
            fn()
    for _ in range(rounds):
        for k, fn in variants.items():
            with block(k):
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# What makes this machine run like a CPU without AVX-512 / VNNI: the vmq_fx kernels, ATen's, oneDNN's (torch._int_mm,
# convolutions) and MKL's (the fp32 GEMM) all capped at AVX2 (bench scripts' --emulate-avx2; onnxruntime has no such
# switch and keeps its own choice).
AVX2_CAPS = {"VMQ_FX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
_CAP_VARIABLES = (*AVX2_CAPS, "VMQ_FX_INT8_GEMM")


def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return " ".join(value.split())
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_generation() -> str:
    """x86's CPU family and model (e.g. "family 25 model 17", an AMD Zen 4), which tells apart machines whose model name
    is only "AMD EPYC" under a VM; empty where /proc/cpuinfo has no such lines (ARM64)."""
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"family {family} model {model}" if family and model else ""


def cpu_class() -> str:
    """The CPU class the numbers belong to, e.g. ``AVX-512 VNNI`` or ``AVX2 (emulated: ...)``, plus the CPU model."""
    from vmq_fx.ops import native

    flags = native._cpu_flags()
    if "asimd" in flags:
        isa = "NEON" + (" + dot product" if "asimddp" in flags else "")
    else:
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
        isa += " VNNI" if {"avx512_vnni", "avx_vnni"} & flags else ""
        if "amx_int8" in flags:
            # the vnni product forced on an AMX CPU in torch and onnxruntime: what a CPU with AVX-512 VNNI and no AMX
            # runs (fp32 uses no AMX)
            forced_vnni = (os.environ.get("VMQ_FX_INT8_GEMM", "").strip().lower() == "vnni"
                           and os.environ.get("VMQ_FX_ORT_AMX") == "0")
            isa += " (AMX present, not used: VMQ_FX_INT8_GEMM=vnni VMQ_FX_ORT_AMX=0)" if forced_vnni else " AMX"
    if all(os.environ.get(k) == v for k, v in AVX2_CAPS.items()):
        isa = f"AVX2 (emulated on {isa}: kernels, ATen, oneDNN and MKL capped at AVX2; onnxruntime not capped)"
    return f"{isa} · {_cpu_model()}"


# How this process's malloc treats freed memory (machine_line reports it): set_malloc.
MALLOC_MODES = ("reuse", "glibc")
_malloc = "glibc's defaults"


def set_malloc(mode: str) -> None:
    """``reuse``: ``vmq_fx.pt2e.memory.reuse_freed_memory()``, as ``vmq bench`` runs (freed activations are served
    again without page faults; by default glibc's heap shrinks and grows around them depending on earlier allocations,
    which moved a W8A8 model's batch-8 time by 1.4x between processes); ``glibc``: as it comes."""
    global _malloc
    from vmq_fx.pt2e.memory import reuse_freed_memory

    if mode == "reuse":
        _malloc = ("freed memory reused (reuse_freed_memory)" if reuse_freed_memory()
                   else "left as it is (reuse_freed_memory refused: not glibc, or MALLOC_* set)")


def machine_line() -> str:
    from vmq_fx.ops import native

    caps = [f"{k}={os.environ[k]}" for k in _CAP_VARIABLES if k in os.environ]
    kernels = native.kernels()
    build = f"vmq_fx kernels {kernels.isa}, int8 GEMM {kernels.int8_gemm()}" if kernels else "vmq_fx kernels off"
    generation = _cpu_generation()
    return (f"{cpu_class()}{f' ({generation})' if generation else ''}; {build}" + (f" ({', '.join(caps)})" if caps else "")
            + f"; {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}; "
            f"malloc: {_malloc}")


def write_class_section(path, intro: str, section: list[str]) -> None:
    """Writes ``section`` (lines, its first a ``## <cpu_class()>`` heading) into the results file at ``path``, replacing
    that CPU class's earlier section and keeping the other classes'; ``intro`` heads a new file."""
    path = Path(path)
    text = path.read_text() if path.exists() else intro.rstrip("\n") + "\n\n"
    head, *sections = text.split("\n## ")
    kept = [s for s in sections if not s.startswith(section[0][3:] + "\n")]
    path.write_text("\n## ".join([head.rstrip("\n") + "\n", *[s.rstrip("\n") + "\n" for s in kept]])
                    + "\n" + "\n".join(section) + "\n")


def scan_inputs(batch: int, dim: int, length: int, n: int, seed: int = 0) -> dict:
    """Selective-scan arguments in the layouts a Vim block passes: u (the convolution's channels-last output), delta, z
    and B / C are transposed views of [batch, L, channels] tensors."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(batch, length, dim).transpose(1, 2), delta=(0.5 * r(batch, length, dim)).transpose(1, 2),
                A=-(torch.rand(dim, n, generator=g) + 0.2), B=r(batch, length, n).transpose(1, 2),
                C=r(batch, length, n).transpose(1, 2), D=r(dim), z=r(batch, length, dim).transpose(1, 2),
                delta_bias=r(dim))


def mamba_ssm_ref():
    """mamba-ssm's pure-torch selective_scan_ref, importable on a CPU machine (see tests/conftest.py)."""
    import sys
    import types

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref


def test_set(limit: int | None = None):
    """Normalized Fashion-MNIST test images and labels (the first ``limit`` of them)."""
    from vmq_fx.app.data import fashion_mnist, normalize

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

    def by_method(self, methods, seeds, **key) -> dict[str, dict[int, dict]]:
        """{method: {seed: record}} of the records matching ``key``, for the methods and seeds asked (those with
        at least one record)."""
        out = {}
        for method in methods:
            runs = {r["seed"]: r for r in self.records if r.get("method") == method and r.get("seed") in seeds
                    and all(r.get(k) == v for k, v in key.items())}
            if runs:
                out[method] = runs
        return out

    def missing(self, seeds, bits, methods, require=(), **key):
        """(seed, bits, method) of the runs matching ``key`` that the cache lacks, or holds without a field of
        ``require`` (a run recorded before the benchmark measured that), seeds outermost: a partial run still gives
        every method on the same seeds."""
        def lacking(r) -> bool:
            return r is None or any(f not in r for f in require)

        return [(seed, b, method) for seed in seeds for b in bits for method in methods
                if lacking(self.get(seed=seed, bits=b, method=method, **key))]

    def add(self, record: dict, replaces: dict | None = None) -> dict:
        """Append ``record``; with ``replaces`` (an older record of the same run), the file is rewritten without it."""
        import json

        if replaces is not None:
            self.records.remove(replaces)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
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


_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student t, 97.5 %


def compare(ours: dict, theirs: dict) -> str:
    """Paired difference ``ours - theirs`` over the seeds both have (mean ± std of the per-seed differences), with
    the verdict used in every table: a two-sided paired t-test at 95 % (with 3 seeds the mean must exceed 2.5 times
    the std of the differences); "within noise" otherwise, "1 seed" when there is nothing to test."""
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return "-"
    diffs = [ours[s] - theirs[s] for s in seeds]
    m, s = mean_std(diffs)
    if len(diffs) == 1:
        return f"{m:+.2f} (1 seed)"
    threshold = _T975.get(len(diffs) - 1, 1.96) * s / len(diffs) ** 0.5
    verdict = "within noise" if abs(m) <= threshold else ("better" if m > 0 else "worse")
    return f"{m:+.2f} ± {s:.2f} ({verdict})"
