"""The C++ CPU kernels are what the dispatcher runs for the vmq ops, can be switched off, and are built per CPU class."""
import logging
import os
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

from host_tools import required_tool
from vmq_fx.ops import native

OPS = ("selective_scan", "causal_conv1d", "hadamard_transform", "rms_norm", "add_rms_norm", "int8_linear", "vq_linear", "vq_dequantize",
       "selective_scan_backward", "token_stats", "histogram_add", "histogram_search")


def _cpu_kernel_source(op: str) -> str | None:
    for line in torch._C._dispatch_dump(f"vmq::{op}").splitlines():
        if line.startswith("CPU:"):
            return line
    return None


def test_cpu_kernels_are_registered_in_the_dispatcher_and_can_be_disabled():
    assert native.kernels() is not None, "the fused CPU kernels did not build (see the log)"
    for op in OPS:
        assert "module.cpp" in (_cpu_kernel_source(op) or ""), op
    with native.disabled():
        assert native.native_kernels() is None
        assert all(_cpu_kernel_source(op) is None for op in OPS)
    assert all("module.cpp" in (_cpu_kernel_source(op) or "") for op in OPS)


_AUTOGRAD_LAYER = os.path.join("torch", "_library", "autograd.py")  # torch.library's register_autograd, in Python


def _autograd_layer_calls(call) -> int:
    """How many Python functions of torch.library's autograd layer run during call()."""
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(1) if event == "call" and
                   frame.f_code.co_filename.endswith(_AUTOGRAD_LAYER) else None)
    try:
        call()
    finally:
        sys.setprofile(None)
    return len(seen)


def _conv(x, w):
    return torch.ops.vmq.causal_conv1d(x, w, None, True, False)


def _norm(x, w):
    return torch.ops.vmq.add_rms_norm(x, x * 0.5, w, 1e-5)[0]


def _scan(x, w):  # w: A [dim, N]
    batch, dim, length = x.shape
    bc = torch.linspace(-1, 1, batch * w.shape[1] * length).view(batch, w.shape[1], length)
    return torch.ops.vmq.selective_scan(x, x.sigmoid(), w, bc, bc.flip(-1), None, None, None, True)[0]


@pytest.mark.parametrize("op, x_shape, w_shape", [(_conv, (1, 6, 3), (3, 4)), (_norm, (2, 3, 8), (8,)),
                                                  (_scan, (1, 4, 5), (4, 3))], ids=["conv", "norm", "scan"])
def test_ops_skip_the_python_autograd_layer_unless_a_gradient_is_needed(op, x_shape, w_shape):
    # Every op's AutogradCPU kernel is the extension's: the quantized linears refuse gradients, the others call
    # torch.library's Python autograd layer only when a gradient is needed (it cost the lowered Vim-T 15 % at batch 1
    # under torch.no_grad()), and then the gradient is the pure-torch path's.
    assert native.kernels() is not None
    for name in OPS:
        autograd = next((l for l in torch._C._dispatch_dump(f"vmq::{name}").splitlines()
                         if l.startswith("AutogradCPU:")), "")
        assert "module.cpp" in autograd, name
    x = torch.linspace(-2, 2, torch.Size(x_shape).numel()).view(x_shape)
    w = -torch.linspace(0.5, 2, torch.Size(w_shape).numel()).view(w_shape).requires_grad_()
    with torch.no_grad():
        assert _autograd_layer_calls(lambda: op(x, w)) == 0
    assert _autograd_layer_calls(lambda: op(x, w.detach())) == 0  # grad mode on, nothing requires grad
    assert _autograd_layer_calls(lambda: op(x, w)) > 0
    grad, = torch.autograd.grad(op(x, w).square().sum(), w)
    with native.disabled():
        expected, = torch.autograd.grad(op(x, w).square().sum(), w)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_importing_the_backend_installs_no_log_or_warning_filters():
    code = ("import logging, warnings, torch, torchao.quantization.pt2e.quantize_pt2e; "  # theirs come first
            "before = list(warnings.filters); import vmq_fx.pt2e.flow, vmq_fx.ops; "
            "assert warnings.filters == before, 'warning filters changed'; "
            "assert not any(logging.getLogger(n).filters for n in ('torchao', 'torch.utils._pytree', "
            "'torch.onnx._internal.exporter._registration')), 'log filters installed'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


_FIRST_CALL = """
import time, torch, vmq_fx
t0 = time.perf_counter()
import vmq_fx.ops
from vmq_fx.ops import native
assert native.native_kernels() is None, "built or loaded at import"
with native.disabled():  # the pure-torch path stays pure inside disabled(), even for a first call
    torch.ops.vmq.causal_conv1d(torch.randn(1, 6, 3), torch.randn(3, 4), None, True, False)
    assert native.native_kernels() is None
out = torch.ops.vmq.causal_conv1d(torch.randn(1, 6, 3), torch.randn(3, 4), None, True, False)
assert native.native_kernels() is not None and out.shape == (1, 6, 3)
assert "module.cpp" in next(l for l in torch._C._dispatch_dump("vmq::causal_conv1d").splitlines() if l.startswith("CPU:"))
print("ok")
"""


def test_kernels_load_at_the_first_op_call_not_at_import():
    # A fresh process: this one has long loaded them.
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_importing_the_package_imports_neither_torch_nor_its_backend():
    code = ("import sys, vmq_fx; import vmq_fx.app.cli; "
            "print(sorted(m for m in ('torch', 'torchao', 'vmq_fx.pt2e', 'vmq_fx.ops') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_the_isa_in_use_is_the_best_this_cpu_runs_unless_one_is_asked_for():
    isas = native.executable_isas()
    assert isas[-1] in ("generic", "neon")
    assert native.kernels().isa == native.selected_isa()
    if not os.environ.get("VMQ_FX_CPU_ISA"):
        assert native.selected_isa() == isas[0]


def test_an_isa_the_cpu_cannot_run_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("VMQ_FX_CPU_ISA", "sve512")
    with pytest.raises(ValueError, match="VMQ_FX_CPU_ISA='sve512': this CPU runs .*the builds are"):
        native.selected_isa()
    monkeypatch.setenv("VMQ_FX_CPU_ISA", native.executable_isas()[-1])
    assert native.selected_isa() == native.executable_isas()[-1]
    with pytest.raises(ValueError, match="this CPU runs"):
        with native.use_isa("sve512"):
            pass


def test_int8_gemm_path_follows_the_cpu_flags(monkeypatch):
    """torch._int_mm only where int8 dot-product instructions exist (it is 32x slower than fp32 without them); the
    kernel's own vpdpbusd product with AVX-512 VNNI and no AMX (or AMX kept off); its own AMX product with AMX, where
    Linux grants the tiles (else vpdpbusd: the next test)."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "VMQ_FX_INT8_GEMM"):
        monkeypatch.delenv(variable, raising=False)
    for flags, isa, want in [({"avx512f", "avx512_vnni"}, "avx512", "vnni"), ({"avx2", "fma"}, "avx2", "int16"),
                             ({"avx512f", "avx512_vnni"}, "avx2", "int16"), ({"avx2", "avx_vnni"}, "avx2", "int_mm"),
                             ({"avx2", "amx_int8"}, "avx2", "int_mm"), (set(), "generic", "int16"),
                             ({"asimd"}, "neon", "float")]:
        monkeypatch.setattr(native, "_cpu_flags", lambda flags=flags: frozenset(flags))
        path, why = native.int8_gemm_path(isa)
        assert path == want, (flags, isa, why)
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN kept off VNNI: its _int_mm saturates then
    assert native.int8_gemm_path("avx512")[0] == "int16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert native.int8_gemm_path("avx512")[0] == "vnni"
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni", "amx_int8"}))
    assert native.int8_gemm_path("avx512")[0] == "vnni"  # AMX kept off by ONEDNN_MAX_CPU_ISA: the AMX product too
    assert native.int8_gemm_path("avx2")[0] == "int_mm"  # no vpdpbusd product in the AVX2 build
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.setattr(native, "_amx_granted", lambda: True)
    assert native.int8_gemm_path("avx512")[0] == "amx"  # the kernel's own product on AMX tiles
    assert native.int8_gemm_path("avx2")[0] == "int_mm"  # no AMX product in the AVX2 build
    monkeypatch.setenv("VMQ_FX_INT8_GEMM", "int_mm")
    assert native.int8_gemm_path("generic") == ("int_mm", "set by VMQ_FX_INT8_GEMM")
    monkeypatch.setenv("VMQ_FX_INT8_GEMM", "vnni")
    with pytest.raises(ValueError, match="VMQ_FX_INT8_GEMM=vnni: the vnni product needs the avx512 build .* build "
                                         "is avx2"):
        native.int8_gemm_path("avx2")
    monkeypatch.setenv("VMQ_FX_INT8_GEMM", "fast")
    with pytest.raises(ValueError, match="VMQ_FX_INT8_GEMM='fast': use int_mm, vnni, amx, int16, float"):
        native.int8_gemm_path()


def test_amx_not_granted_falls_back_to_vnni_and_says_so(monkeypatch, caplog):
    """Linux before 5.16 does not grant a process the AMX tiles (arch_prctl): the AVX-512 build then multiplies with
    vpdpbusd, and the log says why once; forcing the amx path there is refused by name."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "VMQ_FX_INT8_GEMM"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni", "amx_int8"}))
    monkeypatch.setattr(native, "_amx_granted", lambda: False)
    native._warn_amx_not_granted.cache_clear()  # said once a process: this test's first call says it
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        path, why = native.int8_gemm_path("avx512")
        assert native.int8_gemm_path("avx512")[0] == "vnni"
    assert path == "vnni" and "Linux did not grant this process AMX tiles" in why
    said = [r.getMessage() for r in caplog.records if "did not grant" in r.getMessage()]
    assert len(said) == 1, said
    monkeypatch.setenv("VMQ_FX_INT8_GEMM", "amx")
    with pytest.raises(ValueError, match="VMQ_FX_INT8_GEMM=amx: the amx product needs the avx512 build on a Linux CPU "
                                         "with AMX int8 that grants its tiles; here the build is avx512"):
        native.int8_gemm_path("avx512")


def test_vq_decode_mode_follows_its_variable_into_the_kernels(monkeypatch):
    """VQ weights are decoded once by default; VMQ_FX_VQ_DECODE=per_call reaches the registered kernels, a typo is
    named."""
    monkeypatch.delenv("VMQ_FX_VQ_DECODE", raising=False)
    assert native.vq_decode_mode()[0] == "once" and native.kernels().vq_decode_once()
    monkeypatch.setenv("VMQ_FX_VQ_DECODE", "sometimes")
    with pytest.raises(ValueError, match="VMQ_FX_VQ_DECODE='sometimes': use once, per_call"):
        native.vq_decode_mode()
    monkeypatch.setenv("VMQ_FX_VQ_DECODE", "per_call")
    assert native.vq_decode_mode() == ("per_call", "set by VMQ_FX_VQ_DECODE")
    try:
        with native.use_isa(native.selected_isa()) as kernels:
            assert not kernels.vq_decode_once()
    finally:  # registered again without the variable: the later tests run the default
        monkeypatch.delenv("VMQ_FX_VQ_DECODE")
        with native.use_isa(native.selected_isa()):
            pass
    assert native.native_kernels().vq_decode_once()


def test_use_isa_leaves_every_build_as_it_found_it():
    """A product path asked for inside disabled() (the torch implementation) must not stay on the build that
    disabled() re-registers afterwards (it did: later tests ran on the float path)."""
    assert native.kernels() is not None
    isa = native.selected_isa()
    before = native.native_kernels().int8_gemm()
    other = "float" if before == "int_mm" else "int_mm"
    with native.disabled():
        with native.use_isa(isa, int8_gemm=other):
            assert native.native_kernels().int8_gemm() == other
    assert native.native_kernels().int8_gemm() == before
    for build in native.executable_isas():
        with native.use_isa(build, int8_gemm=other):
            pass
    assert native.native_kernels().int8_gemm() == before


def test_kernel_sources_compile_for_arm64(tmp_path):
    """The CPU kernels build for ARM64 (NEON: 16-byte vectors in csrc/vec.h): compiled here with Debian's cross
    compiler against torch's headers (no ARM64 libtorch to link or run against on this machine), in the translation
    units of the x86 builds, two compilers at a time."""
    from torch.utils.cpp_extension import include_paths

    cxx = required_tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    flags = ["-std=c++20", "-O1", "-c", "-fopenmp", "-Wno-psabi", "-DTORCH_EXTENSION_NAME=vmq_arm64",
             *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    compiles = []
    for i, unit in enumerate(native._UNITS):
        source = tmp_path / f"unit{i}.cpp"
        source.write_text(native._unit_source(unit))
        compiles.append(subprocess.Popen([cxx, *flags, str(source), "-o", str(source.with_suffix(".o"))],
                                         stderr=subprocess.PIPE, text=True))
    for unit, compile_ in zip(native._UNITS, compiles):
        _, err = compile_.communicate()
        assert compile_.returncode == 0, (unit, err[-3000:])
    for i in range(len(native._UNITS)):
        header = (tmp_path / f"unit{i}.o").read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_a_lock_left_by_an_interrupted_build_does_not_block_the_next(caplog):
    """torch's builder waits forever while its lock file exists; an old one is removed with a warning."""
    isa = native.selected_isa()
    name = f"vmq_fx_cpu_{isa}"
    build = native._build_dir(name, native._UNITS, native._HEADERS, native._BASE_FLAGS + list(native.ISA_FLAGS[isa]))
    assert any(build.glob(f"{name}*.so")), "the test expects the kernels built (the session fixture does that)"
    lock = build / "lock"
    lock.touch()
    old = time.time() - 2 * native.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="vmq_fx.ops.native"):
        module = native.build_extension("vmq_fx_cpu", native._UNITS, native._HEADERS, "the fused CPU kernels",
                                        isa=isa)
    assert module.isa == isa and not lock.exists()
    assert "did not finish" in caplog.text


def test_a_compile_error_is_one_line_naming_the_file_and_the_error(tmp_path, monkeypatch):
    """A failed build says where and what in one line (the compiler's first error, inside the file that a translation
    unit of several includes), not ninja's last line ("build stopped: subcommand failed")."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "fine.cpp").write_text("int fine() { return 1; }\n")
    (csrc / "broken.cpp").write_text("int broken() {\n  return undeclared_name;\n}\n")
    monkeypatch.setattr(native, "_CSRC", csrc)
    monkeypatch.setenv("VMQ_FX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.BuildError) as err:
        native.build_extension("vmq_fx_broken", (("fine.cpp", "broken.cpp"),), (), "a broken build", isa="generic")
    message = str(err.value)
    assert message.startswith(f"{csrc / 'broken.cpp'}:2:") and "error:" in message and "undeclared_name" in message
    assert "\n" not in message


def test_each_build_registers_its_own_kernels_when_several_are_loaded():
    """Every build (avx512, avx2, generic) is its own module in one process; registering one must put that build's
    kernels in the dispatcher, not another's (a registration list shared between the loaded modules did). Each build
    keeps its own integer-product switch, so which build runs vmq::int8_linear shows in the ATen ops it calls."""
    isas = native.executable_isas()
    if len(isas) < 2:
        pytest.skip("one build runs on this CPU")
    from int8_cases import int8_case

    op_args, _ = int8_case(2, 80, 72, 400, w_bits=8)  # past the direct product: the path's library multiplies

    def aten_ops():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.ops.vmq.int8_linear(*op_args)
        return {e.key for e in prof.key_averages()}

    for isa in isas:  # load them all first
        with native.use_isa(isa):
            pass
    for isa in isas:
        for path in ("int_mm", "float"):
            with native.use_isa(isa, int8_gemm=path) as kernels:
                assert native.native_kernels() is kernels and kernels.isa == isa
                assert ("aten::_int_mm" in aten_ops()) == (path == "int_mm"), (isa, path)
