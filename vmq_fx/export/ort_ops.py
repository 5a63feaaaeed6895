"""The onnxruntime custom-op library of vmq_fx (domain ``vmq``): the fused CPU kernels of the torch ops, torch-free.

An ONNX file exported with ``export_onnx(..., ops="vmq")`` holds, instead of the portable standard operators,

* ``vmq.SelectiveScan``: one node per scan (instead of a standard ``Scan``), the core the torch op runs
  (``vmq_fx/csrc/selective_scan_core.h``: plain pointers and vector extensions);
* ``vmq.CausalConv1d``: the depthwise convolution + SiLU of the Mamba block, the torch op's kernel
  (``vmq_fx/csrc/causal_conv1d_core.h``);
* ``vmq.HadamardTransform``: the online half of a Hadamard rotation, the torch op's fast Walsh-Hadamard transform
  (``vmq_fx/csrc/hadamard_core.h``);
* ``vmq.RmsNorm`` / ``vmq.AddRmsNorm``: a lowered graph's RMSNorm (with the residual add before it), the torch ops'
  one-pass kernels (``vmq_fx/csrc/rms_norm_core.h``);
* ``vmq.Int8Linear``: one node per lowered integer linear. On CPUs with AVX-512 VNNI (the AVX-512 build) the torch
  op's uint8 x int8 product (``vmq_fx/csrc/linear_core.h``'s ``vnni_rows``: quantize, ``vpdpbusd`` and rescale in one
  pass), on CPUs with AMX-INT8 the same on AMX tiles (``amx_rows``, ``tdpbusd``). Elsewhere the torch op's per-token quantize and rescale around onnxruntime's own ``MatMulInteger``, invoked
  from the kernel with the operand types that are exact and fastest on the CPU it runs on (uint8 x int8 with VNNI;
  8-bit weights as uint8 x uint8 without it, where uint8 x int8 saturates; there small products take the torch op's
  int16 product instead, tiny K the torch op's direct product in the AVX-512 build). ``VMQ_FX_ORT_UINT8_WEIGHTS=1``
  forces the uint8 x uint8 form (tests and benchmarks of it on VNNI machines), ``VMQ_FX_ORT_DIRECT=0`` sends every
  product to ``MatMulInteger``, ``VMQ_FX_ORT_AMX=0`` keeps the AMX tiles off (benchmarks of a CPU without AMX).

:func:`vmq_fx.export.ort_session` registers this library for such a file. The wrappers around the shared cores are
in ``vmq_fx/csrc/ort/``. The library links no torch: a deployment needs only onnxruntime and this one file, and the
ops run on onnxruntime's intra-op threads (``intra_op_num_threads``).

Building it needs onnxruntime's C/C++ API headers, which the onnxruntime wheel does not ship. Fetch them once, at
install time (Debian's ``libonnxruntime-dev`` 1.21 package, checked against its SHA-256; nothing is downloaded at run
time):

    python -m vmq_fx.export.ort_ops --fetch-headers

or point ``$VMQ_FX_ORT_INCLUDE`` at an ``include/onnxruntime`` folder of onnxruntime >= 1.21 headers. The C API is
versioned, so headers of 1.21 work with any newer onnxruntime. The library is then compiled on first use (a few
seconds, with the system's C++ compiler, for the CPU class :func:`vmq_fx.ops.native.selected_isa` picks) and cached
under ``$VMQ_FX_CACHE``; ``python -m vmq_fx.export.ort_ops --build`` prints its path. Without Python, the compiler
command at the top of ``vmq_fx/csrc/ort/library.cpp`` builds the same library.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from vmq_fx.ops.native import ISA_FLAGS, cache_root, compiler_error_line, selected_isa

__all__ = ["OrtCustomOpsUnavailable", "custom_ops_library", "fetch_headers", "headers_dir"]

log = logging.getLogger(__name__)

# Debian trixie's onnxruntime development package: only its headers are used.
_HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
_HEADERS_NAME = "onnxruntime-1.21.0-include"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("ort/library.cpp", "ort/selective_scan_op.cpp", "ort/int8_linear_op.cpp", "ort/causal_conv1d_op.cpp",
            "ort/hadamard_op.cpp", "ort/rms_norm_op.cpp")
_DEPENDS = ("ort/ops.h", "selective_scan_core.h", "linear_core.h", "causal_conv1d_core.h", "hadamard_core.h",
            "rms_norm_core.h", "vec.h")


class OrtCustomOpsUnavailable(RuntimeError):
    """vmq_fx's onnxruntime library cannot be built here (the message says why)."""


def headers_dir() -> Path | None:
    """The folder holding ``onnxruntime_cxx_api.h``: ``$VMQ_FX_ORT_INCLUDE``, else what :func:`fetch_headers` put in
    the cache; ``None`` when there is none."""
    env = os.environ.get("VMQ_FX_ORT_INCLUDE")
    candidates = [Path(env)] if env else [cache_root() / _HEADERS_NAME]
    return next((d for d in candidates if (d / "onnxruntime_cxx_api.h").is_file()), None)


def _ar_members(data: bytes):
    """``(name, bytes)`` of a Unix ``ar`` archive (the container of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def fetch_headers(dest: str | os.PathLike | None = None) -> Path:
    """Download onnxruntime's API headers (Debian's ``libonnxruntime-dev`` 1.21, SHA-256 checked) into ``dest``
    (default: the cache folder :func:`headers_dir` looks in). Returns the folder."""
    url, sha256 = _HEADERS_DEB
    dest = Path(dest) if dest is not None else cache_root() / _HEADERS_NAME
    log.info("vmq_fx: downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:  # no network, or the package left Debian's pool
        raise OrtCustomOpsUnavailable(f"could not download {url} ({e}); point VMQ_FX_ORT_INCLUDE at the "
                                      "include/onnxruntime folder of onnxruntime >= 1.21 headers instead") from e
    if hashlib.sha256(data).hexdigest() != sha256:
        raise OrtCustomOpsUnavailable(f"{url}: unexpected SHA-256; not using it")
    payload = next((blob for name, blob in _ar_members(data) if name.startswith("data.tar")), None)
    if payload is None:
        raise OrtCustomOpsUnavailable(f"{url}: no data.tar member")
    dest.mkdir(parents=True, exist_ok=True)
    prefix = "./usr/include/onnxruntime/"
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".h"):
                target = dest / member.name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return dest


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise OrtCustomOpsUnavailable("no C++ compiler found (install g++, or set $CXX) to build vmq_fx's "
                                      "onnxruntime library")
    return cxx


@functools.cache
def custom_ops_library() -> str:
    """The path of the compiled library (built on first use, then cached), for
    ``SessionOptions.register_custom_ops_library``. It links no torch.

    Raises:
        OrtCustomOpsUnavailable: no onnxruntime headers or compiler, or the build failed.
    """
    include = headers_dir()
    if include is None:
        raise OrtCustomOpsUnavailable(
            "vmq_fx's onnxruntime ops need onnxruntime's C++ API headers: run `python -m "
            "vmq_fx.export.ort_ops --fetch-headers` once, or set VMQ_FX_ORT_INCLUDE (or keep the standard Scan: "
            "ops='onnx', --onnx-ops onnx)")
    isa = selected_isa()
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi", *ISA_FLAGS[isa]]
    code = "".join((_CSRC / f).read_text() for f in (*_SOURCES, *_DEPENDS))
    key = hashlib.sha256("\n".join([" ".join(flags), str(include), code]).encode()).hexdigest()[:16]
    library = cache_root() / f"vmq_fx_ort_{isa}-{key}" / "libvmq_fx_ort.so"
    if library.is_file():
        return str(library)
    library.parent.mkdir(parents=True, exist_ok=True)
    log.info("vmq_fx: compiling the vmq onnxruntime library for %s into %s", isa, library.parent)
    partial = library.with_suffix(f".{os.getpid()}.tmp")  # renamed into place when whole: no lock needed
    cmd = [_compiler(), *flags, f"-I{include}", f"-I{_CSRC}", *(str(_CSRC / f) for f in _SOURCES), "-o", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise OrtCustomOpsUnavailable(
            f"the vmq onnxruntime library could not be built: {compiler_error_line(done.stderr)}")
    os.replace(partial, library)
    return str(library)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vmq_fx.export.ort_ops",
                                description="Set up vmq_fx's onnxruntime custom-op library.")
    p.add_argument("--fetch-headers", action="store_true", help="download onnxruntime's API headers (install time)")
    p.add_argument("--build", action="store_true", help="compile the library now instead of on first use")
    args = p.parse_args(argv)
    try:
        if args.fetch_headers and headers_dir() is None:
            print(f"onnxruntime headers in {fetch_headers()}")
        if args.build:
            print(f"built {custom_ops_library()}")
    except OrtCustomOpsUnavailable as e:
        raise SystemExit(f"vmq_fx.export.ort_ops: error: {e}") from None


if __name__ == "__main__":
    main()
