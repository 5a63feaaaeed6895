"""Triton forward of ``vmq::selective_scan`` (the GPU implementation: mamba-ssm's CUDA kernel cannot be built on
the GPU machines available here).

One program per (batch, block of channels) keeps the ``[channels, d_state]`` state in registers and walks the
sequence: ``h = exp(dt * A) * h + dt * u * B_t``, ``y_t = <h, C_t> + D * u_t``, gated by ``z * sigmoid(z)``; ``dt``
gets ``delta_bias`` and softplus (``x`` above 20, as ``torch.nn.functional.softplus``) in registers. B / C are
``[batch, N, L]`` or grouped ``[batch, G, N, L]`` (channel ``c`` reads group ``c // (channels / G)``).

Reference: the CPU implementation of the op and mamba-ssm's ``selective_scan_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmq_fx.ops.selective_scan import sequence_major

__all__ = ["selective_scan_triton"]


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
                     CH, L, N, PER_GROUP, stride_bb, stride_bg,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_N)
    mc, mn = rc < CH, rn < N
    m2 = mc[:, None] & mn[None, :]
    a = tl.load(a_ptr + rc[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    group = rc // PER_GROUP
    bc_off = pid_b * stride_bb + group[:, None] * stride_bg + rn[None, :] * L
    seq = pid_b * CH * L + rc * L
    if HAS_D:
        dvec = tl.load(d_ptr + rc, mask=mc, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rc, mask=mc, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    for t in range(0, L):
        dt = tl.load(delta_ptr + seq + t, mask=mc, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        ut = tl.load(u_ptr + seq + t, mask=mc, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + bc_off + t, mask=m2, other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + bc_off + t, mask=m2, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * a) * h + (dt * ut)[:, None] * bt
        y = tl.sum(h * ct, axis=1)
        if HAS_D:
            y += dvec * ut
        if HAS_Z:
            zt = tl.load(z_ptr + seq + t, mask=mc, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_ptr + seq + t, y, mask=mc)
    tl.store(last_ptr + pid_b * CH * N + rc[:, None] * N + rn[None, :], h, mask=m2)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                          add=None):
    """Same signature and results as ``torch.ops.vmq.selective_scan`` (forward only)."""
    if add is not None:
        out, last = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        return sequence_major(out + add), last
    if reverse:  # the kernel runs forward in time: flip the sequence axis in and out
        out, last = selective_scan_triton(*(t.flip(-1) for t in (u, delta)), A, B.flip(-1), C.flip(-1), D,
                                          None if z is None else z.flip(-1), delta_bias, delta_softplus)
        return out.flip(-1), last
    batch, ch, length = u.shape
    n = A.shape[1]
    grouped = B.dim() == 4
    groups = B.shape[1] if grouped else 1
    Bc, Cc = B.contiguous(), C.contiguous()
    stride_bb = Bc.stride(0)
    stride_bg = Bc.stride(1) if grouped else 0
    out = torch.empty(batch, ch, length, dtype=torch.float32, device=u.device)
    last = torch.empty(batch, ch, n, dtype=torch.float32, device=u.device)
    block_c = 32
    grid = (batch, triton.cdiv(ch, block_c))
    u_c = u.contiguous()
    _scan_fwd_kernel[grid](
        u_c, delta.contiguous(), A.contiguous(), Bc, Cc, D if D is not None else u_c,
        z.contiguous() if z is not None else u_c, delta_bias if delta_bias is not None else u_c, out, last,
        ch, length, n, ch // groups, stride_bb, stride_bg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_C=block_c, BLOCK_N=triton.next_power_of_2(n),
    )
    return sequence_major(out.to(u.dtype)), last.to(A.dtype)
