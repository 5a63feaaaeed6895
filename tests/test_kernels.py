"""Triton kernels against the ops' CPU implementations and float64 references: in Triton's interpreter on CPU tensors
(``make test``: the root conftest sets ``TRITON_INTERPRET=1``), or compiled on CUDA tensors where a GPU is
(``TRITON_INTERPRET=0 pytest -m cuda``: the same tests, marked ``cuda``, against the same CPU references)."""
import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the root conftest.py)", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [] if INTERPRETED else [pytest.mark.cuda]

from vmq_fx.ops.triton.int8_linear import int8_linear_triton  # noqa: E402
from vmq_fx.ops.triton.selective_scan import selective_scan_triton  # noqa: E402
from vmq_fx.ops.triton.vq_linear import vq_linear_triton  # noqa: E402
from int8_cases import int8_case  # noqa: E402
from vmq_fx.ops import int8_linear_reference, pack_codes, vq_linear_reference  # noqa: E402
from vmq_fx.ops.vq_linear import code_bits  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _on_device(*args):
    """The kernel's arguments on DEVICE (the references take the CPU ones)."""
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


def _on_cpu(out):
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("batch,length,k,n,w_bits,a_bits,smooth,bias", [
    (3, 17, 70, 45, 8, 8, True, True),    # M = 51, K and N not multiples of the 64 blocks
    (1, 17, 33, 20, 4, 8, False, True),   # batch 1, odd K with packed int4
    (2, 5, 64, 70, 4, 4, True, False),    # 4-bit activations (clamp at 15)
    (40, 3, 16, 16, 8, 8, False, False),  # M = 120: the large-M tiles
])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_int8_linear_kernel(batch, length, k, n, w_bits, a_bits, smooth, bias, dynamic):
    args, ref_args = int8_case(batch, length, k, n, w_bits, a_bits, smooth, bias, seed=k * n, dynamic=dynamic)
    out = _on_cpu(int8_linear_triton(*_on_device(*args)))
    torch.testing.assert_close(out, torch.ops.vmq.int8_linear(*args), rtol=1e-6, atol=1e-6)  # same levels
    ref = int8_linear_reference(*ref_args)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m,k_in,n,d,k", [
    (1, 10, 70, 4, 256),   # GEMV-like batch 1, K padded to the sub-vector length
    (70, 12, 33, 2, 64),   # 6-bit codes crossing byte boundaries
    (17, 24, 9, 8, 2),     # 1-bit codes
    (5, 9, 65, 1, 16),     # d = 1, 4-bit codes
])
def test_vq_linear_kernel(m, k_in, n, d, k):
    g = _gen(m * n + k)
    per_row = -(-k_in // d)
    codes = pack_codes(torch.randint(0, k, (n, per_row), generator=g), code_bits(k))
    codebook = torch.randn(k, d, generator=g).half()
    scale = torch.randint(150, 230, (n,), generator=g, dtype=torch.uint8)  # 8-bit row-scale codes
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k_in, generator=g)
    out = _on_cpu(vq_linear_triton(*_on_device(x, codes, codebook, scale, bias, k_in)))
    torch.testing.assert_close(out, torch.ops.vmq.vq_linear(x, codes, codebook, scale, bias, k_in),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), vq_linear_reference(x, codes, codebook, scale, bias, k_in),
                               rtol=1e-5, atol=1e-5)


def test_int8_linear_kernel_rounds_ties_to_even():
    # power-of-two scale and x on half levels: every x / scale is an exact tie, where rounding modes differ
    g = _gen(3)
    x = (torch.randint(-20, 20, (2, 17, 32), generator=g).float() + 0.5) * 0.0625
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    args = (x, None, torch.full((17,), 0.0625), torch.full((17,), 128, dtype=torch.int32), w, torch.ones(16),
            w.int().sum(1, dtype=torch.int32), None, 0, 255, 8)
    torch.testing.assert_close(_on_cpu(int8_linear_triton(*_on_device(*args))), torch.ops.vmq.int8_linear(*args),
                               rtol=0, atol=0)


def test_vq_linear_kernel_refuses_wide_codes():
    with pytest.raises(ValueError, match="at most 8"):
        vq_linear_triton(*_on_device(torch.randn(2, 4), torch.zeros(3, 2, dtype=torch.uint8), torch.randn(4096, 4),
                                     torch.ones(3), None, 4))


@pytest.mark.parametrize("batch,ch,length,n,groups,extras", [
    (2, 40, 13, 16, 0, True),    # channels not a multiple of the 32 block, odd L, D / z / bias / softplus
    (1, 8, 1, 5, 0, False),      # L = 1, N not a power of two, no extras
    (2, 40, 9, 4, 4, True),      # grouped B / C (VMamba's four directions)
])
def test_selective_scan_kernel(batch, ch, length, n, groups, extras):
    g = _gen(ch * length + n)
    u = torch.randn(batch, ch, length, generator=g)
    delta = torch.randn(batch, ch, length, generator=g) * 0.5
    A = -torch.rand(ch, n, generator=g) - 0.1
    bc_shape = (batch, groups, n, length) if groups else (batch, n, length)
    B, C = torch.randn(*bc_shape, generator=g), torch.randn(*bc_shape, generator=g)
    D = torch.randn(ch, generator=g) if extras else None
    z = torch.randn(batch, ch, length, generator=g) if extras else None
    bias = torch.randn(ch, generator=g) * 0.1 if extras else None
    out, last = _on_cpu(selective_scan_triton(*_on_device(u, delta, A, B, C, D, z, bias, extras)))
    ref_out, ref_last = torch.ops.vmq.selective_scan(u, delta, A, B, C, D, z, bias, extras)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)


def test_selective_scan_kernel_reverse_add_and_sequence_major_inputs():
    """As Vim's lowered blocks call it: u, delta and z transposes of sequence-major [batch, L, channels] activations,
    the backward direction (reverse) with the forward direction's output added."""
    g = _gen(11)
    batch, ch, length, n = 2, 40, 13, 16
    u, delta, z = (torch.randn(batch, length, ch, generator=g).transpose(1, 2) for _ in range(3))
    A = -torch.rand(ch, n, generator=g) - 0.1
    B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    D, bias = torch.randn(ch, generator=g), torch.randn(ch, generator=g) * 0.1
    add = torch.randn(batch, length, ch, generator=g).transpose(1, 2)
    args = (u, 0.5 * delta, A, B, C, D, z, bias, True, True, add)
    out, last = _on_cpu(selective_scan_triton(*_on_device(*args)))
    ref_out, ref_last = torch.ops.vmq.selective_scan(*args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)


def test_selective_scan_kernel_matches_mamba_ssm_reference(mamba_ssm_ref):
    g = _gen(7)
    u, delta = torch.randn(2, 24, 11, generator=g), torch.randn(2, 24, 11, generator=g)
    A = -torch.rand(24, 16, generator=g)
    B, C = torch.randn(2, 16, 11, generator=g), torch.randn(2, 16, 11, generator=g)
    D, z, bias = torch.randn(24, generator=g), torch.randn(2, 24, 11, generator=g), torch.randn(24, generator=g)
    out, last = _on_cpu(selective_scan_triton(*_on_device(u, delta, A, B, C, D, z, bias, True)))
    ref_out, ref_last = mamba_ssm_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


_COMPILE_FOR_HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vmq_fx.ops.triton._common import gemm_blocks
from vmq_fx.ops.triton.int8_linear import COMPILE_OPTIONS, _int8_linear_kernel
from vmq_fx.ops.triton.selective_scan import _scan_fwd_kernel
from vmq_fx.ops.triton.vq_linear import _vq_linear_kernel


def compile_for_sm90(kernel, types, constexprs, options=None):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"][:4] == b"\\x7fELF", kernel
    return compiled.asm["ptx"]


def blocks(m):
    return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), gemm_blocks(m)))


int8 = {"x_ptr": "*fp32", "smooth_ptr": "*fp32", "scale_ptr": "*fp32", "zp_ptr": "*i32", "wscale_ptr": "*fp32",
        "wsum_ptr": "*i32", "bias_ptr": "*fp32", "out_ptr": "*fp32", "qmin": "fp32", "qmax": "fp32", "eps": "fp32"}
done = 0
# each code path (4-bit weights, per-token dynamic) at batch-1 tiles, and the large-M tiles
for w4, dynamic, m in ((False, False, 1), (True, False, 1), (False, True, 1), (True, True, 1), (False, False, 4096)):
    ptx = compile_for_sm90(_int8_linear_kernel, {**int8, "w_ptr": "*u8" if w4 else "*i8"},
                           dict(HAS_SMOOTH=True, HAS_BIAS=True, W4=w4, DYNAMIC=dynamic, **blocks(m)), COMPILE_OPTIONS)
    # the CPU's levels and floats: no contracted multiply-add, no approximate division
    assert "fma.rn.f32" not in ptx and "div.full" not in ptx and "div.approx" not in ptx, (w4, dynamic, m)
    done += 1
vq = {"x_ptr": "*fp32", "codes_ptr": "*u8", "codebook_ptr": "*fp16", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
      "out_ptr": "*fp32"}
for bits, d, m in ((2, 4, 1), (3, 2, 4096)):  # ViM-VQ's 2- and 3-bit codebooks
    done += bool(compile_for_sm90(_vq_linear_kernel, vq, dict(D=d, BITS=bits, HAS_BIAS=True, **blocks(m))))
scan = {name: "*fp32" for name in ("u_ptr", "delta_ptr", "a_ptr", "b_ptr", "c_ptr", "d_ptr", "z_ptr", "bias_ptr",
                                   "out_ptr", "last_ptr")}
done += bool(compile_for_sm90(_scan_fwd_kernel, scan, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                                                           BLOCK_C=32, BLOCK_N=16)))
print(done)
"""


def test_kernels_compile_for_hopper(tmp_path):
    """The kernels run interpreted here; compiled, they have never run on this project's machines. Triton compiles
    them for the H100 / H200 (sm_90: Triton IR, LLVM, PTX, then ptxas to machine code) without a GPU: each code
    path of the launchers' specializations, in a process without the interpreter and with an empty kernel cache;
    the int8 kernel with its launcher's options, into PTX without fused multiply-adds or approximate divisions."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "8"
