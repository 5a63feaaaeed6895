"""The compiled CPU kernels of vmq_fx: fused selective scan (forward and backward), causal convolution, integer and
VQ linears.

:func:`enable` (called when :mod:`vmq_fx.ops` is imported) registers them in torch's dispatcher as the CPU
implementations of ``vmq::selective_scan``, ``vmq::causal_conv1d``, ``vmq::int8_linear``, ``vmq::vq_linear`` and
``vmq::vq_dequantize``, over the pure-torch implementations the ops are defined with: a call from an exported graph
goes straight to C++.
:func:`disabled` switches back to the pure-torch implementations for a while (tests, benchmarks).

They are C++ (``vmq_fx/csrc``) built with torch's own extension tooling (``torch.utils.cpp_extension.load``: ninja and
the system C++ compiler) the first time a process needs them, for the CPU it runs on (``-march=native``), and cached
under ``$VMQ_FX_CACHE`` (default ``~/.cache/vmq_fx``), so later processes load them in well under a second. Why this
route: it needs nothing beyond what installing torch already brings on Linux (a compiler and ninja), it uses torch's
thread pool (``torch.set_num_threads`` applies), and it compiles for the exact CPU instead of shipping one binary per
instruction set.

When they cannot be built (no compiler, ``VMQ_FX_NATIVE=0``), every op keeps its pure-torch implementation and one
line says why.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["disabled", "enable", "native_kernels"]

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("module.cpp", "selective_scan.cpp", "causal_conv1d.cpp", "quant_linear.cpp", "calibration.cpp")
_HEADERS = ("kernels.h", "vec.h")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-Wno-psabi"]


def _cpu_signature() -> str:
    """What -march=native depends on: a cache built on another CPU model is not reused."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return "\n".join(lines)


def cache_root() -> Path:
    """Where builds (and fetched build inputs) are cached: ``$VMQ_FX_CACHE``, default ``~/.cache/vmq_fx``."""
    return Path(os.environ.get("VMQ_FX_CACHE") or Path.home() / ".cache" / "vmq_fx")


def _build_dir(prefix: str, files: tuple[str, ...], extra: str) -> Path:
    # torch rebuilds when a listed source changes, not a header: the files' text is part of the directory name.
    code = "".join((_CSRC / f).read_text() for f in files)
    key = "\n".join([torch.__version__, sys.version, _cpu_signature(), " ".join(_FLAGS), extra, code])
    return cache_root() / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class BuildError(RuntimeError):
    """A C++ build under ``vmq_fx/csrc`` failed; the message is the compiler's last line."""


def build_extension(name: str, sources: tuple[str, ...], headers: tuple[str, ...], what: str,
                    include_dirs: tuple[str, ...] = (), python_module: bool = True):
    """Compile ``sources`` (paths under ``vmq_fx/csrc``) with torch's extension tooling for this CPU, or load them
    from the cache (a directory per content of ``sources + headers``, CPU, torch and ``include_dirs``).

    Returns:
        The Python module, or with ``python_module=False`` the path of the shared library.

    Raises:
        BuildError: no compiler / ninja, or a compile error (one line: the build's last).
    """
    from torch.utils.cpp_extension import load

    build = _build_dir(name, sources + headers, " ".join(include_dirs))
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob(f"{name}*.so")):
        log.info("vmq_fx: compiling %s into %s (first use on this machine, about a minute)", what, build)
    try:
        module = load(name=name, sources=[str(_CSRC / s) for s in sources], extra_cflags=_FLAGS,
                      extra_ldflags=["-fopenmp"], extra_include_paths=list(include_dirs), build_directory=str(build),
                      is_python_module=python_module, verbose=False)
    except Exception as e:
        raise BuildError((str(e).strip().splitlines() or [type(e).__name__])[-1][:300]) from e
    return module if python_module else str(build / f"{name}.so")


@functools.cache
def _build() -> ModuleType | None:
    """The compiled module, or ``None`` (with one logged warning saying why) when it cannot be had."""
    if os.environ.get("VMQ_FX_NATIVE", "1") == "0":
        log.warning("vmq_fx: VMQ_FX_NATIVE=0: using the pure-torch CPU implementations (slower)")
        return None
    try:
        return build_extension("vmq_fx_cpu", _SOURCES, _HEADERS, "the fused CPU kernels")
    except BuildError as e:  # fall back, say why once
        log.warning("vmq_fx: the fused CPU kernels could not be built (%s); using the pure-torch implementations "
                    "(slower). Set VMQ_DEBUG=1 and see torch.utils.cpp_extension's output for details.", e)
        return None


def enable() -> bool:
    """Register the C++ kernels as the CPU implementations of the vmq ops (building them first if needed).

    Returns whether they are active. Idempotent.
    """
    module = _build()
    if module is not None:
        module.register_cpu_kernels()
    return module is not None


def native_kernels() -> ModuleType | None:
    """The compiled module while its kernels are the ops' CPU implementations, else ``None``."""
    module = _build()
    return module if module is not None and module.cpu_kernels_registered() else None


@contextlib.contextmanager
def disabled():
    """Run the vmq ops on their pure-torch implementations inside the block.

    Example:
        >>> from vmq_fx.ops import native
        >>> with native.disabled():
        ...     assert native.native_kernels() is None
    """
    module = native_kernels()
    if module is not None:
        module.deregister_cpu_kernels()
    try:
        yield
    finally:
        if module is not None:
            module.register_cpu_kernels()
