"""Triton ``vmq::vq_linear``: decodes codewords from the bit-packed codes on the fly inside a GEMM.

Each program loads an activation tile and, for the same K range, the packed code bytes of its output rows; it reads
each code's ``b`` bits (spanning at most two bytes, so ``b <= 8``), gathers the codeword element from the codebook
(small: ``k x d`` float16, cache resident) and accumulates ``x @ W^T`` in float32; the row scales and the bias are
applied in the epilogue. Small M (GEMV-like, memory bound: where 2-bit weights pay) uses narrow M tiles.

Reference: :func:`vmq_fx.ops.vq_linear_reference` (float64) and the CPU implementation of the op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmq_fx.ops.triton._common import gemm_blocks
from vmq_fx.ops.vq_linear import code_bits, decode_row_scale

__all__ = ["vq_linear_triton"]


@triton.jit
def _vq_linear_kernel(x_ptr, codes_ptr, codebook_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, NBYTES,
                      D: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
        bit = (rk // D) * BITS
        byte = bit // 8
        wmask = mk[:, None] & mn[None, :]
        row = codes_ptr + rn[None, :] * NBYTES
        b0 = tl.load(row + byte[:, None], mask=wmask, other=0).to(tl.int32)
        b1 = tl.load(row + byte[:, None] + 1, mask=wmask & ((byte + 1) < NBYTES)[:, None], other=0).to(tl.int32)
        code = ((b0 | (b1 << 8)) >> (bit % 8)[:, None]) & ((1 << BITS) - 1)
        w = tl.load(codebook_ptr + code * D + (rk % D)[:, None], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.dot(x, w, input_precision="ieee")
    out = acc * tl.load(scale_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=mm[:, None] & mn[None, :])


def vq_linear_triton(x, codes, codebook, row_scale, bias, in_features):
    """Same signature and result as ``torch.ops.vmq.vq_linear`` (codes of at most 8 bits)."""
    k, d = codebook.shape
    bits = code_bits(k)
    if bits > 8:
        raise ValueError(f"vq_linear_triton: codes of {bits} bits (k={k}) are not supported; at most 8")
    x2 = x.reshape(-1, in_features).contiguous()
    m, n = x2.shape[0], codes.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bm, bn, bk = gemm_blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _vq_linear_kernel[grid](
        x2, codes.contiguous(), codebook.contiguous(), decode_row_scale(row_scale).contiguous(),
        bias.float().contiguous() if bias is not None else x2, out, m, n, in_features, codes.shape[1],
        D=d, BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out.reshape(*x.shape[:-1], n).to(x.dtype)
