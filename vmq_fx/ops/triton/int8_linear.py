"""Triton ``vmq::int8_linear``: per-token quantization fused into an int8 x int8 -> int32 ``tl.dot`` GEMM.

One kernel reads the float activation tile, divides by the smoothing scale, quantizes it per token in registers
(``x * (1 / act_scale[t])``, ties to even, + zero point, clamp), shifts the unsigned levels into int8, multiplies
with the int8 (or in-kernel unpacked int4) weight tile on the tensor cores, and applies the zero-point correction
(``(shift - zp[t]) * w_sum[n]``, the column sums stored by the lowering), the per-token x per-channel scales and the
bias in the epilogue. Per-token dynamic (no ``act_scale``): a first sweep over each row block's K finds the rows'
ranges, and their scales and zero points are computed in registers. The PTQ4VM code used three kernels (quantize, SIMT
GEMM, dequantize) for the same.

The levels are the CPU's: every division rounds correctly (``tl.math.div_rn``; Triton's ``/`` compiles to PTX's
approximate ``div.full.f32``), and the kernel is compiled without contracting a product and the addition after it
into one fused multiply-add (:data:`COMPILE_OPTIONS`; compiled for sm_90 with Triton's defaults its PTX had 24), which
could take a level's rounding (``v - floor(v)``) or the rescale's bias addition from an unrounded product: the C++
kernels round each product, as torch's separate ops do. ``tests/test_kernels.py`` checks both in the PTX.

Reference: :func:`vmq_fx.ops.int8_linear_reference` (float64) and the CPU implementation of the op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmq_fx.ops.triton._common import gemm_blocks, round_half_even

__all__ = ["int8_linear_triton", "COMPILE_OPTIONS"]

COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _int8_linear_kernel(x_ptr, smooth_ptr, scale_ptr, zp_ptr, w_ptr, wscale_ptr, wsum_ptr, bias_ptr, out_ptr,
                        M, N, K, L, stride_wn, qmin, qmax, shift, eps,
                        HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, W4: tl.constexpr, DYNAMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    if DYNAMIC:
        # Per-token dynamic: a first sweep over the row block's K finds each row's range (widened to hold 0), and
        # its parameters follow in float32 as torchao's choose_qparams_affine computes them.
        lo = tl.zeros((BLOCK_M,), dtype=tl.float32)
        hi = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            x = x.to(tl.float32)
            if HAS_SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + rk, mask=mk, other=1.0))
            lo = tl.minimum(lo, tl.min(x, axis=1))
            hi = tl.maximum(hi, tl.max(x, axis=1))
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax - qmin), eps)
        zp = tl.minimum(tl.maximum(qmin - round_half_even(tl.math.div_rn(lo, scale)), qmin), qmax).to(tl.int32)
    else:
        tok = rm % L
        scale = tl.load(scale_ptr + tok, mask=mm, other=1.0)
        zp = tl.load(zp_ptr + tok, mask=mm, other=0)
    inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + rk, mask=mk, other=1.0))
        q = round_half_even(x * inv[:, None]) + zp[:, None].to(tl.float32)
        q = tl.minimum(tl.maximum(q, qmin), qmax)
        q8 = (q - shift).to(tl.int8)
        wmask = mk[:, None] & mn[None, :]
        if W4:
            byte = tl.load(w_ptr + rn[None, :] * stride_wn + (rk // 2)[:, None], mask=wmask, other=0).to(tl.int32)
            nib = (byte >> ((rk % 2) * 4)[:, None]) & 15
            w = (nib - ((nib >> 3) * 16)).to(tl.int8)
        else:
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=wmask, other=0)
        acc += tl.dot(q8, w, out_dtype=tl.int32)
    wsum = tl.load(wsum_ptr + rn, mask=mn, other=0)
    acc += (shift - zp)[:, None] * wsum[None, :]
    out = acc.to(tl.float32) * scale[:, None] * tl.load(wscale_ptr + rn, mask=mn, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=mm[:, None] & mn[None, :])


def int8_linear_triton(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax, w_bits):
    """Same signature and result as ``torch.ops.vmq.int8_linear``."""
    length, k = x.shape[-2], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bm, bn, bk = gemm_blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    dynamic = act_scale is None
    _int8_linear_kernel[grid](
        x2, smooth if smooth is not None else x2, x2 if dynamic else act_scale.float().contiguous(),
        x2 if dynamic else act_zero_point.to(torch.int32).contiguous(), w.contiguous(), w_scale.float().contiguous(),
        w_sum.to(torch.int32).contiguous(),
        bias.float().contiguous() if bias is not None else x2, out,
        m, n, k, length, w.stride(0), float(act_qmin), float(act_qmax), 128 if act_qmax > 127 else 0,
        torch.finfo(torch.float32).eps,
        HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, W4=w.dtype == torch.uint8, DYNAMIC=dynamic,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **COMPILE_OPTIONS,
    )
    return out.reshape(*x.shape[:-1], n).to(x.dtype)
