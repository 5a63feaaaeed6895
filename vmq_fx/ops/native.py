"""The compiled CPU kernels of vmq_fx: fused selective scan (forward and backward), causal convolution, integer and
VQ linears, calibration statistics.

:func:`enable` registers them in torch's dispatcher as the CPU implementations of the vmq ops (each kernel file of
``csrc/`` registers its own), over the pure-torch implementations the ops are defined with: a call from an exported
graph goes straight to C++. Nothing is built or
loaded at import: the first call of a vmq op on CPU tensors (:func:`builds_on_first_call`) or the first
:func:`kernels` lookup calls :func:`enable`. :func:`disabled` switches back to the pure-torch implementations for a
while (tests, benchmarks).

They are C++ (``vmq_fx/csrc``) built with torch's own extension tooling (``torch.utils.cpp_extension.load``: ninja and
the system C++ compiler) the first time they are needed on a machine, and cached under ``$VMQ_FX_CACHE`` (default
``~/.cache/vmq_fx``, a folder per build, checkout and source text), so later processes load them in well under a
second. Why this route: it needs nothing beyond
what installing torch already brings on Linux (a compiler and ninja) and it uses torch's thread pool
(``torch.set_num_threads`` applies).

One build per CPU class, chosen at run time, as ATen compiles its kernels once per ``CPU_CAPABILITY``:

========== ======================================================= ==================================
ISA        compiler flags                                          runs on
========== ======================================================= ==================================
``avx512`` ``-mavx512f -mavx512bw -mavx512vl -mavx512dq`` (+ AVX2) x86-64 with AVX-512 (Skylake-SP, Zen 4)
``avx2``   ``-mavx2 -mfma -mf16c``                                 x86-64 with AVX2 + FMA (Haswell, Zen 1-3)
``generic`` none (x86-64 baseline: SSE2)                           any x86-64
``neon``   none (the ARM64 baseline includes NEON)                 ARM64
========== ======================================================= ==================================

The kernels' vectors are one register of the build's ISA wide (``csrc/vec.h``). The best ISA the CPU runs is used;
``$VMQ_FX_CPU_ISA`` picks another one (one of :func:`executable_isas`), and :func:`use_isa` switches for a while
(tests run every path the machine can execute).

How ``vmq::int8_linear`` multiplies is chosen per CPU too (:func:`int8_gemm_path`, logged once): oneDNN's matmul
primitive for the large products where the CPU has AMX, vmq_fx's own uint8 x int8 product (``vpdpbusd``) where it has
AVX-512 VNNI, ``torch._int_mm`` where it has AVX-VNNI only, else (x86) vmq_fx's own int16 product (``vpmaddwd``,
exact) or (ARM64) the fp32 GEMM on the dequantized levels and weight. On every path the kernel multiplies small
products, few rows and tiny K itself (exact, in one pass with the quantization and the rescale), where a library call
would cost more than the arithmetic. ``vmq::vq_linear`` decodes each VQ weight once and keeps the float32 weight
(:func:`vq_decode_mode`: FP32 speed; per call where memory matters more).

When they cannot be built (no compiler, ``VMQ_FX_NATIVE=0``), every op keeps its pure-torch implementation and one
line says why.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import platform
import sys
import time
import typing
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["INT8_DOT_FLAGS", "INT8_GEMM_PATHS", "ONEDNN_CAPS_WITHOUT_AMX", "ONEDNN_CAPS_WITHOUT_INT8_DOT",
           "VQ_DECODE_MODES", "builds_on_first_call", "compiler_error_line", "disabled", "enable", "executable_isas",
           "int8_gemm_path", "int8_gemm_runs", "kernels", "native_kernels", "selected_isa", "use_isa", "vq_decode_mode"]

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Every kernel file of csrc/ (each registers its own ops, csrc/kernels.h); csrc/ort/ is the onnxruntime library's.
_SOURCES = tuple(sorted(p.name for p in _CSRC.glob("*.cpp")))
_HEADERS = tuple(sorted(p.name for p in _CSRC.glob("*.h")))
# Two translation units for two cores: the pybind module alone (torch/extension.h takes ~28 s to parse) and every
# kernel file together. Compiled one by one, each kernel file spent ~9 s of its 11-17 s parsing ATen's headers; together
# they take 35 s, the build as a whole 35 s instead of 64-71 s (g++ -O3, a 2-core Intel Xeon). So the kernel files
# share one namespace scope: two of them may not define the same file-local name.
_MODULE = "module.cpp"
_UNITS = ((_MODULE,), tuple(s for s in _SOURCES if s != _MODULE))
_BASE_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "generic": (),
    "neon": (),
}
# What each x86 build needs from the CPU (names as in /proc/cpuinfo).
_ISA_CPU_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.cache
def executable_isas() -> tuple[str, ...]:
    """The kernel builds this CPU can run, best first.

    Example:
        >>> from vmq_fx.ops import native
        >>> native.executable_isas()[-1] in ("generic", "neon")
        True
    """
    if _is_arm64():
        return ("neon",)
    flags = _cpu_flags()
    if not flags:  # no /proc/cpuinfo: ask ATen, which probed the CPU itself
        cap = torch.backends.cpu.get_cpu_capability()
        return {"AVX512": ("avx512", "avx2", "generic"), "AVX2": ("avx2", "generic")}.get(cap, ("generic",))
    return tuple(isa for isa, need in _ISA_CPU_FLAGS.items() if need <= flags)


def selected_isa() -> str:
    """The build the ops use: ``$VMQ_FX_CPU_ISA`` if set, else the best of :func:`executable_isas`.

    Raises:
        ValueError: ``$VMQ_FX_CPU_ISA`` names a build this CPU cannot run (or none at all).
    """
    isas = executable_isas()
    want = os.environ.get("VMQ_FX_CPU_ISA", "").strip().lower()
    if not want:
        return isas[0]
    if want not in isas:
        raise ValueError(f"VMQ_FX_CPU_ISA={want!r}: this CPU runs {', '.join(isas)}"
                         + ("" if want in ISA_FLAGS else f" (the builds are {', '.join(ISA_FLAGS)})"))
    return want


# ONEDNN_MAX_CPU_ISA values below oneDNN's first ISA with int8 dot products (AVX2_VNNI), and those below AMX
ONEDNN_CAPS_WITHOUT_INT8_DOT = ("SSE41", "AVX", "AVX2", "AVX512_CORE")
ONEDNN_CAPS_WITHOUT_AMX = ONEDNN_CAPS_WITHOUT_INT8_DOT + ("AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE_VNNI",
                                                          "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512")
# /proc/cpuinfo flags of the int8 dot-product instructions that make oneDNN's int8 products exact and fast
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# How vmq::int8_linear can multiply (csrc/int8_linear.cpp)
INT8_GEMM_PATHS = ("int_mm", "vnni", "amx", "int16", "float")


def int8_gemm_path(isa: str | None = None) -> tuple[str, str]:
    """How ``vmq::int8_linear`` multiplies on this CPU with the build ``isa``: ``(path, why)``, ``path`` one of
    :data:`INT8_GEMM_PATHS`.

    ``torch._int_mm`` (oneDNN's gemm API) is exact and fast where the CPU has int8 dot-product instructions: measured
    2.0x the fp32 GEMM with AVX-512 VNNI, but 32x *slower* on an AVX2-only CPU (Vim-T shapes). It does not use AMX
    tiles. The AVX-512 build multiplies in vmq_fx's own kernels, exact, the quantization and the rescale in the
    product's pass: on AMX tiles where the CPU has AMX-INT8 and Linux grants them (``"amx"``: ``tdpbusd``; Vim-T's
    in_proj at batch 8 2.2x the ``vpdpbusd`` product, vim_tiny W8A8 1.56x / 1.70x FP32 at batch 1 / 8, Intel Xeon,
    one thread; few rows and tiny K on ``vpdpbusd``), else with AVX-512 VNNI (``"vnni"``: ``vpdpbusd``; Vim-T's large
    linears as fast as through ``_int_mm``, the small ones 1.2-1.3x); what they cannot take exactly (levels wider
    than 8 bits) goes to ``_int_mm``. ``ONEDNN_MAX_CPU_ISA`` below AMX keeps the AMX product off as well.
    Without int8 dot products an x86 build multiplies int16 levels with ``vpmaddwd`` in vmq_fx's own kernel
    (``"int16"``: exact, 1.0-1.36x the fp32 GEMM at Vim-T shapes with AVX2, quantization and rescale included); ARM64
    builds multiply the dequantized activation levels and the dequantized weight in the fp32 GEMM (``"float"``, the
    Q/DQ graph's computation, see ``csrc/int8_linear.cpp``): the FP32 model's work plus one pass over the input.
    ``$VMQ_FX_INT8_GEMM`` (one of :data:`INT8_GEMM_PATHS`) overrides the choice. The pure-torch
    implementation of the op follows the same choice (``torch._int_mm`` for ``"vnni"`` and ``"amx"``: the same
    integers).
    """
    isa = isa or selected_isa()
    forced = os.environ.get("VMQ_FX_INT8_GEMM", "").strip().lower()
    if forced:
        if forced not in INT8_GEMM_PATHS:
            raise ValueError(f"VMQ_FX_INT8_GEMM={forced!r}: use {', '.join(INT8_GEMM_PATHS)}")
        if not int8_gemm_runs(forced, isa):
            vnni = f" on a CPU {'with' if 'avx512_vnni' in _cpu_flags() else 'without'} AVX-512 VNNI"
            raise ValueError(f"VMQ_FX_INT8_GEMM={forced}: {_PATH_NEEDS[forced]}; here the build is {isa}"
                             + (vnni if forced == "vnni" else ""))
        return forced, "set by VMQ_FX_INT8_GEMM"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in ONEDNN_CAPS_WITHOUT_INT8_DOT:
        # Capped oneDNN falls back to 16-bit pair sums that saturate: torch._int_mm then returns wrong numbers (measured
        # with AVX2 on an AVX-512 VNNI CPU: 79 % of a 17 x 96 x 40 product off), not merely slow ones.
        return _without_int8_dot(isa, f"ONEDNN_MAX_CPU_ISA={cap} keeps torch._int_mm off int8 dot-product "
                                      "instructions")
    flags = _cpu_flags()
    amx_off = ""
    if "amx_int8" in flags:
        if cap in ONEDNN_CAPS_WITHOUT_AMX:
            amx_off = f", and AMX int8 kept off by ONEDNN_MAX_CPU_ISA={cap}"
        elif isa == "avx512" and _amx_granted():
            return "amx", "the CPU has AMX int8: vmq_fx's own uint8 x int8 product on AMX tiles"
        elif isa == "avx512":
            _warn_amx_not_granted()
            amx_off = ", and Linux did not grant this process AMX tiles"
    if isa == "avx512" and "avx512_vnni" in flags:
        return "vnni", f"the CPU has AVX-512 VNNI{amx_off}: vmq_fx's own uint8 x int8 product"
    if "amx_int8" in flags:
        return "int_mm", f"the CPU has AMX int8 (and VNNI, which torch._int_mm uses); no AMX product in the {isa} build"
    if isa in ("avx2", "avx512") and "avx_vnni" in flags:
        return "int_mm", "the CPU has AVX-VNNI"
    return _without_int8_dot(isa, f"no int8 dot-product instructions for the {isa} build (VNNI / AMX), where "
                                  "torch._int_mm is slower than the fp32 GEMM")


_PATH_NEEDS = {"vnni": "the vnni product needs the avx512 build on a CPU with AVX-512 VNNI",
               "amx": "the amx product needs the avx512 build on a Linux CPU with AMX int8 that grants its tiles",
               "int16": "the int16 product needs an x86 build"}


def int8_gemm_runs(path: str, isa: str | None = None) -> bool:
    """Whether ``vmq::int8_linear`` of the build ``isa`` (default :func:`selected_isa`) can multiply on ``path`` (one
    of :data:`INT8_GEMM_PATHS`) on this CPU: ``"vnni"`` needs the ``avx512`` build and AVX-512 VNNI, ``"amx"`` the
    ``avx512`` build and AMX-INT8 tiles that Linux grants, ``"int16"`` an x86 build; the library paths run on every CPU
    (slowly, or under a capped oneDNN wrongly, where :func:`int8_gemm_path` does not pick them).

    Example:
        >>> from vmq_fx.ops import native
        >>> native.int8_gemm_runs("float"), native.int8_gemm_runs("vnni", "generic")
        (True, False)
    """
    isa = isa or selected_isa()
    if path == "vnni":
        return isa == "avx512" and "avx512_vnni" in _cpu_flags()
    if path == "amx":
        return isa == "avx512" and "amx_int8" in _cpu_flags() and _amx_granted()
    if path == "int16":
        return isa != "neon"
    return path in INT8_GEMM_PATHS


@functools.cache
def _amx_granted() -> bool:
    """Whether Linux lets this process use AMX tile data: it must ask once (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, Linux 5.16 and later), as the kernels' ``has_amx`` does; the answer holds for the process."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import ctypes

    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64 Linux, <asm/prctl.h>
    try:
        args = (ctypes.c_long(sys_arch_prctl), ctypes.c_long(arch_req_xcomp_perm), ctypes.c_long(xfeature_xtiledata))
        return ctypes.CDLL(None, use_errno=True).syscall(*args) == 0
    except (OSError, AttributeError):
        return False


@functools.cache  # once a process: int8_gemm_path runs at every kernel switch, and per call on the pure-torch path
def _warn_amx_not_granted() -> None:
    log.warning("vmq_fx: the CPU has AMX int8 but Linux did not grant this process its tiles (arch_prctl "
                "ARCH_REQ_XCOMP_PERM; Linux 5.16 and later): vmq_fx's vpdpbusd product (vnni) multiplies instead")


def _without_int8_dot(isa: str, why: str) -> tuple[str, str]:
    if isa == "neon":
        return "float", f"{why}: the integer levels are multiplied in the fp32 GEMM"
    return "int16", f"{why}: int16 levels are multiplied with vpmaddwd (exact)"


# How vmq::vq_linear gets its float32 weight (csrc/vq_linear.cpp)
VQ_DECODE_MODES = ("once", "per_call")


def vq_decode_mode() -> tuple[str, str]:
    """How ``vmq::vq_linear`` gets its float32 weight: ``(mode, why)``, ``mode`` one of :data:`VQ_DECODE_MODES`.

    ``"once"`` (the default): each VQ weight is decoded on its first call and the float32 weight is kept while its
    codes live. The product is then the FP32 model's GEMM, so a VQ model runs at FP32 speed, and holds the FP32
    weights in memory beside its codes (onnxruntime does the same: it decodes a VQ file's weights into initializers
    when it loads the file). ``"per_call"``: the weight is decoded on every call into scratch memory, so only the codes
    stay in memory; the decode is work the fp32 linear does not do (0.83-0.93x of it at Vim-T shapes, batch 1). Saved
    files and ONNX exports are the same either way. ``$VMQ_FX_VQ_DECODE`` picks.

    Example:
        >>> vq_decode_mode()[0] in VQ_DECODE_MODES
        True
    """
    forced = os.environ.get("VMQ_FX_VQ_DECODE", "").strip().lower()
    if not forced:
        return "once", "the default: FP32 speed, the float32 weights kept beside the codes"
    if forced not in VQ_DECODE_MODES:
        raise ValueError(f"VMQ_FX_VQ_DECODE={forced!r}: use {', '.join(VQ_DECODE_MODES)}")
    return forced, "set by VMQ_FX_VQ_DECODE"


def cache_root() -> Path:
    """Where builds (and fetched build inputs) are cached: ``$VMQ_FX_CACHE``, default ``~/.cache/vmq_fx``."""
    return Path(os.environ.get("VMQ_FX_CACHE") or Path.home() / ".cache" / "vmq_fx")


def _build_dir(prefix: str, units: tuple[tuple[str, ...], ...], headers: tuple[str, ...], flags: list[str]) -> Path:
    # torch rebuilds when a listed source changes, not a header: the files' text is part of the directory name.
    code = "".join((_CSRC / f).read_text() for f in (*sorted(s for unit in units for s in unit), *headers))
    # The sources' folder too: torch's build files name them by path, so two checkouts sharing one folder would
    # rebuild it each time the other one ran.
    key = "\n".join([torch.__version__, sys.version, platform.machine(), " ".join(flags), repr(units), str(_CSRC), code])
    return cache_root() / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class BuildError(RuntimeError):
    """A C++ build under ``vmq_fx/csrc`` failed; the message is the compiler's first error."""


def compiler_error_line(output: str) -> str:
    """The line of a failed build's output that names the problem: the compiler's first error (its last lines are
    often a caret, and ninja's only says that a command failed), else the last line.

    Example:
        >>> compiler_error_line("In file included from unit1.cpp:3:\\na.cpp:7:12: error: 'x' was not declared\\n"
        ...                     "    7 |   return x;\\nninja: build stopped: subcommand failed.")
        "a.cpp:7:12: error: 'x' was not declared"
    """
    lines = [line.strip() for line in output.strip().splitlines()] or ["(no output)"]
    return next((line for line in lines if "error:" in line), lines[-1])[:300]


# A build takes under a minute on two cores; a lock much older than that was left by one that did not finish.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(lock: Path, what: str) -> None:
    """torch's extension builder holds ``lock`` in the build folder while it compiles and waits, silently and without
    end, while it exists: a build interrupted (Ctrl-C, a time-out) leaves it behind and would block every later one."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("vmq_fx: removing %s, left %.0f minutes ago by a build of %s that did not finish", lock, age / 60,
                    what)
        lock.unlink(missing_ok=True)
    else:
        log.warning("vmq_fx: waiting for another process's build of %s (lock %s, %.0f s old; delete it if no build "
                    "is running)", what, lock, age)


def _unit_source(unit: tuple[str, ...]) -> str:
    """The text of one translation unit: an ``#include`` of each of its files under ``vmq_fx/csrc``."""
    return "".join(f'#include "{_CSRC / s}"\n' for s in unit)


def build_extension(name: str, units: tuple[tuple[str, ...], ...], headers: tuple[str, ...], what: str,
                    isa: str | None = None) -> ModuleType:
    """Compile ``units`` (translation units, each a tuple of paths under ``vmq_fx/csrc`` compiled as one file) with
    torch's extension tooling for the CPU class ``isa`` (default :func:`selected_isa`), or load them from the cache (a
    directory per content of the sources and ``headers``, flags and torch).

    Returns:
        The Python module.

    Raises:
        BuildError: no compiler / ninja, or a compile error (one line: :func:`compiler_error_line`).
    """
    from torch.utils.cpp_extension import load

    isa = isa or selected_isa()
    name = f"{name}_{isa}"  # one module per build: two of them can be loaded in one process
    flags = _BASE_FLAGS + list(ISA_FLAGS[isa])
    build = _build_dir(name, units, headers, flags)
    build.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build / "lock", what)
    if not any(build.glob(f"{name}*.so")):
        log.info("vmq_fx: compiling %s for %s into %s (first use on this machine, under a minute)", what, isa, build)
    paths = []
    for i, unit in enumerate(units):
        # Written only when missing or changed (ninja compiles again what is newer than its object), whole (replaced
        # into place: another process may be reading it).
        combined = build / f"unit{i}.cpp"
        text = _unit_source(unit)
        if not combined.is_file() or combined.read_text() != text:
            partial = combined.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(text)
            os.replace(partial, combined)
        paths.append(str(combined))
    try:
        return load(name=name, sources=paths, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=str(build), verbose=False)
    except Exception as e:
        raise BuildError(compiler_error_line(str(e)) if str(e).strip() else type(e).__name__) from e


@functools.cache
def _build(isa: str) -> ModuleType:
    return build_extension("vmq_fx_cpu", _UNITS, _HEADERS, "the fused CPU kernels", isa=isa)


_active: ModuleType | None = None  # the build whose kernels the dispatcher runs (None: the pure-torch fallback)


def _forget_cached_dispatch() -> None:
    """Drop what torch's Python dispatcher (torch.export, AOTAutograd) cached of the vmq ops' dispatch tables. It keeps,
    per op and dispatch key, which key's kernel runs, and forgets it when Python registers a kernel but not when C++
    does. A cache filled while the C++ kernels (with their AutogradCPU kernel) were registered kept AOTAutograd's calls
    away from the Python autograd layer once they were removed: its gradients came out None (opcheck on the pure-torch
    path after a torch.export on the kernels, in one test process)."""
    for op in torch._ops.get_cached_ops():
        if op.namespace == "vmq":
            op._dispatch_cache.clear()


def _switch(module: ModuleType, on: bool) -> None:
    """Register (``on``) or remove ``module``'s kernels in the dispatcher, and drop the Python dispatcher's cache of
    the vmq ops, which a C++ (de)registration leaves stale."""
    if on:
        module.register_cpu_kernels()
    else:
        module.deregister_cpu_kernels()
    _forget_cached_dispatch()


def _register(module: ModuleType, int8_gemm: str | None = None) -> None:
    global _active
    if _active is not None and _active is not module:
        _active.deregister_cpu_kernels()
    path, why = (int8_gemm, "asked for") if int8_gemm else int8_gemm_path(module.isa)
    vq, vq_why = vq_decode_mode()
    changed = (_active is None or _active.isa != module.isa or module.int8_gemm() != path
               or module.vq_decode_once() != (vq == "once"))
    module.set_int8_gemm(path)
    module.set_vq_decode_once(vq == "once")
    _switch(module, True)
    if changed:
        log.info("vmq_fx: CPU kernels built for %s; int8 linears multiply with %s (%s); VQ linears decode their "
                 "weights %s (%s)", module.isa, path, why, vq.replace("_", " "), vq_why)
    _active = module


_attempted = False  # enable() ran (whatever came of it): the first-use hooks stay out of the way from then on
_suppressed = 0  # depth of disabled() blocks: no first-use build inside them


@functools.cache
def enable() -> bool:
    """Register the C++ kernels of :func:`selected_isa` as the CPU implementations of the vmq ops (building them
    first if needed); one logged warning says why when they cannot be had.

    Returns whether they are active. Idempotent; the first call of an op does it when nobody did.
    """
    global _attempted
    _attempted = True
    if os.environ.get("VMQ_FX_NATIVE", "1") == "0":
        log.warning("vmq_fx: VMQ_FX_NATIVE=0: using the pure-torch CPU implementations (slower)")
        return False
    try:
        module = _build(selected_isa())
    except BuildError as e:  # fall back, say why once
        log.warning("vmq_fx: the fused CPU kernels could not be built (%s); using the pure-torch implementations "
                    "(slower). Set VMQ_DEBUG=1 and see torch.utils.cpp_extension's output for details.", e)
        return False
    _register(module)
    return True


def native_kernels() -> ModuleType | None:
    """The compiled module while its kernels are the ops' CPU implementations, else ``None`` (loads nothing)."""
    return _active if _active is not None and _active.cpu_kernels_registered() else None


def kernels() -> ModuleType | None:
    """:func:`native_kernels`, after :func:`enable` if nothing has tried it yet (outside :func:`disabled`): which
    build runs, for tests, benchmarks and ``make venv``'s build step."""
    if not _attempted and not _suppressed:
        enable()
    return native_kernels()


def builds_on_first_call(op: str):
    """Decorate the pure-torch implementation of ``vmq::<op>``: its first call on CPU tensors builds or loads the C++
    kernels (:func:`enable`) and, once they are registered, hands the call to them through the dispatcher. Later calls
    reach the pure-torch implementation only where the kernels are not registered (other devices, :func:`disabled`,
    no compiler).
    """
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not _attempted and not _suppressed and isinstance(args[0], torch.Tensor) and \
                    args[0].device.type == "cpu" and enable() and native_kernels() is not None:
                return getattr(torch.ops.vmq, op).default(*args, **kwargs)
            return fn(*args, **kwargs)

        # torch.library infers the op's schema from the signature, resolving string annotations in the globals of
        # the function it is given: hand it the resolved ones of the definition.
        hints = typing.get_type_hints(fn)
        if hints.get("return") is type(None):  # get_type_hints turns "-> None" into NoneType, which torch refuses
            hints["return"] = None
        sig = inspect.signature(fn)
        run.__signature__ = sig.replace(
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()],
            return_annotation=hints.get("return", sig.return_annotation))
        return run
    return decorate


@contextlib.contextmanager
def disabled():
    """Run the vmq ops on their pure-torch implementations inside the block.

    Example:
        >>> from vmq_fx.ops import native
        >>> with native.disabled():
        ...     assert native.native_kernels() is None
    """
    global _suppressed
    module = native_kernels()
    if module is not None:
        _switch(module, False)
    _suppressed += 1
    try:
        yield
    finally:
        _suppressed -= 1
        if module is not None:
            _switch(module, True)


@contextlib.contextmanager
def use_isa(isa: str, int8_gemm: str | None = None):
    """Run the vmq ops on the kernels built for ``isa`` (one of :func:`executable_isas`) inside the block; with
    ``int8_gemm`` (one of :data:`INT8_GEMM_PATHS`), ``vmq::int8_linear`` multiplies that way instead of
    :func:`int8_gemm_path`'s choice.

    Raises:
        ValueError: this CPU cannot run that build.
        BuildError: it could not be compiled.

    Example:
        >>> from vmq_fx.ops import native
        >>> with native.use_isa(native.executable_isas()[-1]) as kernels:
        ...     assert native.native_kernels() is kernels
    """
    if isa not in executable_isas():
        raise ValueError(f"use_isa({isa!r}): this CPU runs {', '.join(executable_isas())}")
    if int8_gemm is not None and int8_gemm not in INT8_GEMM_PATHS:
        raise ValueError(f"use_isa(int8_gemm={int8_gemm!r}): use one of {', '.join(INT8_GEMM_PATHS)}")
    if int8_gemm is not None and not int8_gemm_runs(int8_gemm, isa):
        raise ValueError(f"use_isa({isa!r}, int8_gemm={int8_gemm!r}): {_PATH_NEEDS[int8_gemm]}")
    previous = native_kernels()
    previous_gemm = previous.int8_gemm() if previous is not None else None
    module = _build(isa)
    module_gemm = module.int8_gemm()
    _register(module, int8_gemm)
    try:
        yield module
    finally:
        if module is not previous:  # its own setting too: a disabled() block around this one re-registers it as is
            module.set_int8_gemm(module_gemm)
        if previous is not None:
            _register(previous, previous_gemm)
        else:
            _switch(module, False)
