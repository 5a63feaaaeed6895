"""The compiled CPU kernels of vmq_fx (fused selective scan, integer and VQ linear helpers).

They are C++ (``vmq_fx/csrc``) built with torch's own extension tooling (``torch.utils.cpp_extension.load``: ninja and
the system C++ compiler) the first time a process needs them, for the CPU it runs on (``-march=native``), and cached
under ``$VMQ_FX_CACHE`` (default ``~/.cache/vmq_fx``), so later processes load them in well under a second. Why this
route: it needs nothing beyond what installing torch already brings on Linux (a compiler and ninja), it uses torch's
thread pool (``torch.set_num_threads`` applies), and it compiles for the exact CPU instead of shipping one binary per
instruction set.

When they cannot be built (no compiler, ``VMQ_FX_NATIVE=0``), every op falls back to its pure-torch implementation
and one line says why.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["native_kernels"]

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("module.cpp", "selective_scan.cpp", "quant_linear.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-Wno-psabi"]


def _cpu_signature() -> str:
    """What -march=native depends on: a cache built on another CPU model is not reused."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return "\n".join(lines)


def _build_dir() -> Path:
    key = "\n".join([torch.__version__, sys.version, _cpu_signature(), " ".join(_FLAGS)])
    root = Path(os.environ.get("VMQ_FX_CACHE") or Path.home() / ".cache" / "vmq_fx")
    return root / f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled kernel module, or ``None`` (with one logged warning saying why) when it cannot be had."""
    if os.environ.get("VMQ_FX_NATIVE", "1") == "0":
        log.warning("vmq_fx: VMQ_FX_NATIVE=0: using the pure-torch CPU implementations (slower)")
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("vmq_fx_cpu*.so")):
            log.info("vmq_fx: compiling the fused CPU kernels into %s (first use on this machine, about a minute)",
                     build)
        return load(name="vmq_fx_cpu", sources=[str(_CSRC / s) for s in _SOURCES], extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler / ninja, or a build error: fall back, say why once
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        log.warning("vmq_fx: the fused CPU kernels could not be built (%s); using the pure-torch implementations "
                    "(slower). Set VMQ_DEBUG=1 and see torch.utils.cpp_extension's output for details.", reason)
        return None
