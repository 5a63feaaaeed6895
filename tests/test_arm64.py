"""The torch-free kernel cores (``vmq_fx/csrc/*_core.h``, shared by the torch ops and the onnxruntime ops) run on ARM64:
``tests/arm64_cores.cpp`` is cross-compiled with Debian's aarch64 compiler and run under qemu-user, and its outputs are
compared here with float64 references (the scan's step-by-step loop, ``F.conv1d``, ``int8_linear_reference``, a
Hadamard matrix built by Kronecker products). That
runs the ARM64 build of ``vec.h`` (16-byte NEON vectors; the 2^x, exp, sigmoid and softplus of the builds without
AVX-512) and of the integer linear's row arithmetic, which ``test_native.py`` only compiles. No ARM64 libtorch is
available here, so the torch wrappers around the cores are compiled (``test_kernel_sources_compile_for_arm64``), not
run."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from host_tools import required_tool
from int8_cases import int8_case
from test_selective_scan import scan_loop_f64, underflowing_decay_inputs
from vmq_fx.ops import int8_linear_reference, native

DRIVER = Path(__file__).with_name("arm64_cores.cpp")


@pytest.fixture(scope="module")
def arm64_cores(tmp_path_factory):
    """run(op, inputs, *params) -> read(name, dtype, shape): the driver under qemu-aarch64 on ``inputs`` (name ->
    array), its outputs read back."""
    cxx = required_tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    qemu = required_tool("qemu-aarch64", "qemu-user")
    exe = tmp_path_factory.mktemp("arm64") / "arm64_cores"
    build = subprocess.run([cxx, "-O3", "-std=c++17", "-static", "-Wno-psabi", f"-I{native._CSRC}", str(DRIVER), "-o",
                            str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]

    def run(op, inputs, *params):
        folder = tmp_path_factory.mktemp(op)  # numbered: one folder per call
        for name, array in inputs.items():
            np.ascontiguousarray(array).tofile(folder / f"{name}.bin")
        done = subprocess.run([qemu, str(exe), op, str(folder), *(str(int(p)) for p in params)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["neon"], done.stdout  # vec.h's ARM64 path, not the generic one

        def read(name, dtype, shape):
            return torch.from_numpy(np.fromfile(folder / f"{name}.bin", dtype=dtype).reshape(shape))

        return read

    return run


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("n_state", [16, 5], ids=["N16", "N5"])  # N = 16: the state in registers; 5: any N
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sequence_major", [False, True], ids=["channel-major", "sequence-major"])
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw-dt"])
def test_scan_matches_the_float64_reference_on_arm64(arm64_cores, n_state, reverse, sequence_major, softplus):
    """The fused scan's core on NEON: D, the gate and a bias of delta, two groups of B and C, 22 channels (a partial
    block of lanes), 37 steps, the reverse direction; with softplus (the decay's 2^x without its upper clamp) and
    without (positive raw time steps; the clamped 2^x); an ``add`` (the op's output plus another direction's); against a
    float64 loop over the steps (test_selective_scan.py's; the output and the last state)."""
    batch, dim, length, groups = 2, 22, 37, 2
    g = torch.Generator().manual_seed(n_state)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5 - 1
    z = torch.randn(batch, dim, length, generator=g)
    B = torch.randn(batch, groups, n_state, length, generator=g)
    C = torch.randn(batch, groups, n_state, length, generator=g)
    A = -torch.rand(dim, n_state, generator=g) * 4 - 0.1
    D = torch.randn(dim, generator=g)
    bias = torch.randn(dim, generator=g) * 0.5
    add = torch.randn(batch, dim, length, generator=g)
    if not softplus:
        delta, bias = delta.sigmoid(), bias.abs() * 0.1
    layout = (lambda t: t.transpose(1, 2)) if sequence_major else (lambda t: t)
    read = arm64_cores("scan", {"u": _f32(layout(u)), "delta": _f32(layout(delta)), "z": _f32(layout(z)),
                                "B": _f32(B), "C": _f32(C), "A": _f32(A), "D": _f32(D), "delta_bias": _f32(bias),
                                "add": _f32(layout(add))},
                       batch, dim, length, n_state, groups, softplus, reverse, True, True, True, sequence_major, True)
    out = read("out", np.float32, (batch, length, dim)).transpose(1, 2)
    last = read("last", np.float32, (batch, dim, n_state))

    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    ref, ref_last = scan_loop_f64(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), bias,
                                  delta_softplus=softplus)
    assert _rel(out, flip(ref) + add) < 1e-5
    assert _rel(last, ref_last) < 1e-5


def test_scan_decays_below_the_float_range_on_arm64(arm64_cores):
    """NEON's 2^x drops its clamps only for channel blocks whose decays stay in float32's normal range (without them
    it wraps below 2^-126): test_selective_scan's case, most blocks out of range and the last in."""
    args = underflowing_decay_inputs(40)
    read = arm64_cores("scan", {"u": _f32(args["u"]), "delta": _f32(args["delta"]), "B": _f32(args["B"][:, None]),
                                "C": _f32(args["C"][:, None]), "A": _f32(args["A"])},
                       1, 40, 4, 16, 1, True, False, False, False, False, False, False)
    ref, ref_last = scan_loop_f64(**args, delta_softplus=True)
    assert _rel(read("out", np.float32, (1, 4, 40)).transpose(1, 2), ref) < 1e-5
    assert _rel(read("last", np.float32, (1, 40, 16)), ref_last) < 1e-5


@pytest.mark.parametrize("kernel", [4, 3])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti-causal"])
def test_causal_conv1d_matches_the_float64_reference_on_arm64(arm64_cores, kernel, reverse):
    """The depthwise (anti-)causal convolution + bias + SiLU on NEON, 13 channels (a partial vector), against
    F.conv1d in float64 (anti-causal: the causal one of the time-reversed input, reversed)."""
    batch, length, channels = 2, 20, 13
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(batch, length, channels, generator=g)
    taps = torch.randn(kernel, channels, generator=g)
    bias = torch.randn(channels, generator=g)
    read = arm64_cores("conv", {"x": _f32(x), "taps": _f32(taps), "bias": _f32(bias)}, batch, length, channels,
                       kernel, True, True, reverse)
    out = read("out", np.float32, (batch, length, channels))

    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    xs = flip(x.double().transpose(1, 2))
    ref = F.conv1d(F.pad(xs, (kernel - 1, 0)), taps.double().t().unsqueeze(1), bias.double(), groups=channels)
    ref = F.silu(flip(ref)).transpose(1, 2)
    assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("w_bits", [8, 4])
def test_int8_linear_levels_and_direct_product_on_arm64(arm64_cores, w_bits):
    """The integer linear's per-token quantization gives exactly the levels of the specification, computed here in
    float32 by torch (rounding half to even), and the direct product (levels x weight in float FMAs, exact on
    these integer sums) then the rescale match int8_linear_reference in float64. 70 rows (not a multiple of the
    4-row blocks), K = 45 and N = 37 (partial vectors)."""
    (x, smooth, act_scale, zp, _, w_scale, _, bias, qmin, qmax, _), ref_args = int8_case(2, 35, 45, 37, w_bits=w_bits)
    w_int = ref_args[4]
    M, K, N = x.shape[0] * x.shape[1], x.shape[2], w_int.shape[0]
    read = arm64_cores("linear", {"x": _f32(x.reshape(M, K)), "smooth": _f32(smooth), "act_scale": _f32(act_scale),
                                  "act_zero_point": zp.numpy(), "w": w_int.int().numpy(), "w_scale": _f32(w_scale),
                                  "bias": _f32(bias)},
                       M, K, N, qmin, qmax, act_scale.numel(), True, True)
    levels = read("levels", np.int32, (2, 35, K))
    expected = (torch.round(x / smooth * (1.0 / act_scale).unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(qmin, qmax)
    assert torch.equal(levels, expected.int())
    assert (levels == qmin).any() and (levels == qmax).any(), "the case should reach both clamps"
    out = read("out", np.float32, (2, 35, N))
    assert _rel(out, int8_linear_reference(*ref_args)) < 1e-5


@pytest.mark.parametrize("d, m", [(64, 1), (96, 3), (2, 1), (40, 5), (256, 2)], ids=["64", "3x32", "2", "5x8", "2x128"])
def test_hadamard_transform_matches_the_float64_matrix_on_arm64(arm64_cores, d, m):
    """The rotation's transform on NEON: segments of 64 values in registers (16 vectors), of 32 mixed by a 3 x 3
    matrix, shorter than a vector (2), of 8 (two vectors) mixed by a 5 x 5 one, and of 128 (past the registers: in a
    work buffer) mixed by a 2 x 2 one; against x @ kron(odd, H_b) / sqrt(b) in float64, H_b built by Kronecker
    products of [[1, 1], [1, -1]]."""
    rows, b = 7, d // m
    g = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=g)
    odd = torch.randn(m, m, generator=g)
    inputs = {"x": _f32(x)} | ({"odd": _f32(odd)} if m > 1 else {})
    out = arm64_cores("hadamard", inputs, rows, d, m)("out", np.float32, (rows, d))

    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    ref = x.double() @ torch.kron(odd.double() if m > 1 else torch.ones(1, 1, dtype=torch.float64), h) / b**0.5
    assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("d", [192, 17, 3])
def test_rms_norm_matches_float64_and_the_x86_builds_on_arm64(arm64_cores, d):
    """The norm on NEON (four vectors of 4 partial sums, a scalar tail, a row shorter than the partials) against float64,
    and bit for bit against this machine's builds: the sum's order does not depend on the vector width."""
    from vmq_fx.ops.rms_norm import rms_norm

    rows = 7
    g = torch.Generator().manual_seed(d)
    x, w = torch.randn(rows, d, generator=g) * 5, torch.rand(d, generator=g) + 0.5
    out = arm64_cores("rms_norm", {"x": _f32(x), "w": _f32(w)}, rows, d)("out", np.float32, (rows, d))
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert ((out.double() - ref).abs() / ref.abs()).max() < 6e-7
    assert torch.equal(out, rms_norm(x, w, 1e-5))
