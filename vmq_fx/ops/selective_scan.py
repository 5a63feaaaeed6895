"""``vmq::selective_scan``: the selective-scan (S6) recurrence of Mamba as one custom op.

The op is the seam that makes Mamba models traceable: under ``torch.export`` it stays a single graph node (its fake
implementation gives the output shapes), eagerly it runs a chunked pure-torch implementation that works on any
device, and it carries an analytic backward so that scales upstream of it can be trained (JLSS).

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` for real ``A`` and input-dependent
``B``/``C``::

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * u_t * B_t
    y_t    = <h_t, C_t> + D * u_t
    out_t  = y_t * silu(z_t)                       (when z is given)
    out_t  = out_t + add_t                         (when add is given)

With ``reverse=True`` the recurrence runs from ``t = L - 1`` down to ``0`` (``h_t`` depends on ``h_{t+1}``), and every
output stays at its own position: the result equals flipping ``u, delta, B, C, z`` along L, scanning, and flipping
``out`` back, which is Vim's backward direction, without the flips.

Shapes: ``u, delta, z``: [batch, dim, L]; ``A``: [dim, N]; ``B, C``: [batch, N, L] or grouped [batch, G, N, L] with
``dim % G == 0`` (channel ``d`` reads group ``d // (dim // G)``); ``D, delta_bias``: [dim]; ``add``: [batch, dim, L].
Inputs may have any strides.

``add`` is not mamba-ssm's: Vim sums its two directions' outputs, and the lowering hands the later scan the earlier
one's output (:func:`vmq_fx.pt2e.lowering.scan_sum.fuse_scan_sums`), so that the sum is written in the scan's output
pass instead of by an add over both (3 % of the lowered Vim-T at batch 8). The same float sum, bit for bit.

Layout of the result: ``out`` is [batch, dim, L] stored as [batch, L, dim] (strides ``(L * dim, 1, dim)``, every
implementation and the fake alike): what reads it next is a linear over the channels (``out_proj`` after
``out.transpose(1, 2)``), which then gets a contiguous input instead of copying one, and the CPU kernel writes one
row of channels per step instead of scattering each channel's sequence.

Implementations: on CPU tensors the fused C++ kernel of :mod:`vmq_fx.ops.native` (state in registers, forward and
backward), registered in the dispatcher over the implementation below; a GPU implementation (Triton) registers
itself for CUDA tensors with ``selective_scan_op.register_kernel("cuda")``; the chunked pure-torch implementation
below is the reference and the fallback when the C++ kernels cannot be built.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["selective_scan_backward", "selective_scan_fn", "selective_scan_op"]

# The work is done on slices of the batch and chunks of the sequence sized so that one chunk's [T, batch, dim, N]
# tensors stay in cache (1 MB): the scan is bound by memory traffic, and batch elements are independent. Measured on
# a 2-core CPU at batch 500 x 192 x 17 x 16: 3.5x faster than 16 MB chunks over the whole batch.
_STATE_ELEMENTS = 1 << 15  # batch slice * dim * N
_CHUNK_ELEMENTS = 1 << 18  # T * batch slice * dim * N


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, add) -> None:
    def fail(msg: str):
        raise ValueError(f"vmq.selective_scan: {msg}")

    if u.dim() != 3:
        fail(f"u must be [batch, dim, L], got shape {list(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        fail(f"delta must have u's shape {list(u.shape)}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be [dim={dim}, N], got {list(A.shape)}")
    if A.is_complex():
        fail("complex A is not supported (Visual Mamba models use real A)")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape[0] == batch and t.shape[1] == n and t.shape[2] == length
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2] == n and t.shape[3] == length and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            fail(
                f"{name} must be [batch={batch}, N={n}, L={length}] or [batch, G, N, L] with G dividing dim={dim}, "
                f"got {list(t.shape)} (input-independent B/C of shape [dim, N] are not supported)"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        fail(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            fail(f"{name} must be [dim={dim}], got {list(t.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        fail(f"z must have u's shape {list(u.shape)}, got {list(z.shape)}")
    if add is not None and tuple(add.shape) != tuple(u.shape):
        fail(f"add must have u's shape {list(u.shape)}, got {list(add.shape)}")


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    # float32 like mamba-ssm, but float64 inputs keep float64 so the op can be checked against float64 loops.
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _groups(u: Tensor, B: Tensor, C: Tensor) -> int:
    if B.dim() == 4:
        return B.shape[1]
    if C.dim() == 4:
        return C.shape[1]
    return 1


def _time_major(x: Tensor, groups: int, cdt: torch.dtype) -> Tensor:
    """[batch, dim, L] -> [L, batch, G, H], contiguous so that each time step is one dense slice."""
    b, d, length = x.shape
    return x.to(cdt).reshape(b, groups, d // groups, length).permute(3, 0, 1, 2).contiguous()


def _bc_time_major(t: Tensor, groups: int, cdt: torch.dtype) -> Tensor:
    """B or C ([batch, N, L] or [batch, G, N, L]) -> [L, batch, G or 1, N]."""
    t = t.to(cdt)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.permute(3, 0, 1, 2).contiguous()


def _chunk_len(batch: int, dim: int, n: int, length: int) -> int:
    return max(1, min(length, _CHUNK_ELEMENTS // max(1, batch * dim * n)))


class _Prepared:
    """Inputs rearranged once into time-major [L, batch, G, H(, N)] float tensors."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.groups = _groups(u, B, C)
        g, h = self.groups, self.dim // self.groups
        self.u = _time_major(u, g, self.cdt)
        raw = _time_major(delta, g, self.cdt)
        if delta_bias is not None:
            raw = raw + delta_bias.to(self.cdt).reshape(g, h)
        self.delta_raw = raw
        self.delta = F.softplus(raw) if delta_softplus else raw
        self.A = A.to(self.cdt).reshape(g, h, self.n)
        self.B = _bc_time_major(B, g, self.cdt)
        self.C = _bc_time_major(C, g, self.cdt)
        self.D = None if D is None else D.to(self.cdt).reshape(g, h)
        self.z = None if z is None else _time_major(z, g, self.cdt)
        self.chunk = _chunk_len(self.batch, self.dim, self.n, self.length)

    def chunks(self):
        return [(s, min(s + self.chunk, self.length)) for s in range(0, self.length, self.chunk)]

    def decay_and_input(self, s: int, e: int) -> tuple[Tensor, Tensor]:
        """exp(delta*A) and delta*u*B for steps [s, e): two [T, batch, G, H, N] tensors."""
        dl = self.delta[s:e].unsqueeze(-1)
        decay = torch.exp(dl * self.A)
        inp = (dl * self.u[s:e].unsqueeze(-1)) * self.B[s:e].unsqueeze(3)
        return decay, inp

    def states(self, s: int, e: int, h0: Tensor) -> tuple[Tensor, Tensor]:
        """(decay, states) for steps [s, e) starting from state h0; states[t] is h after step s + t."""
        decay, hs = self.decay_and_input(s, e)
        prev = h0
        for t in range(e - s):
            # In place: the delta*u*B buffer becomes the state history of the chunk.
            hs[t].addcmul_(decay[t], prev)
            prev = hs[t]
        return decay, hs

    def readout(self, s: int, e: int, hs: Tensor) -> Tensor:
        """y_t = <h_t, C_t> + D u_t for steps [s, e): [T, batch, G, H]."""
        y = torch.matmul(hs, self.C[s:e].unsqueeze(-1)).squeeze(-1)
        if self.D is not None:
            y = y + self.D * self.u[s:e]
        return y

    def zero_state(self) -> Tensor:
        return self.u.new_zeros(self.batch, self.groups, self.dim // self.groups, self.n)

    def to_sequence_major(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[L, batch, G, H] -> [batch, L, dim]."""
        return x.permute(1, 0, 2, 3).reshape(self.batch, self.length, self.dim).to(dtype).contiguous()

    def to_channels_first(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[L, batch, G, H] -> [batch, dim, L]."""
        return x.permute(1, 2, 3, 0).reshape(self.batch, self.dim, self.length).to(dtype).contiguous()


def _batch_slices(batch: int, dim: int, n: int) -> list[slice]:
    step = max(1, _STATE_ELEMENTS // max(1, dim * n))
    return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]


def _per_batch(t: Optional[Tensor], sl: slice) -> Optional[Tensor]:
    return None if t is None else t[sl]


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    outs, states = [], []
    for sl in _batch_slices(u.shape[0], u.shape[1], A.shape[1]):
        out, state = _forward_slice(u[sl], delta[sl], A, B[sl], C[sl], D, _per_batch(z, sl), delta_bias,
                                    delta_softplus)
        outs.append(out)
        states.append(state)
    return torch.cat(outs), torch.cat(states)


def _forward_slice(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = torch.empty(p.length, p.batch, p.groups, p.dim // p.groups, dtype=p.cdt, device=u.device)
    h = p.zero_state()
    for s, e in p.chunks():
        _, hs = p.states(s, e, h)
        out[s:e] = p.readout(s, e, hs)
        h = hs[-1].clone()
    if p.z is not None:
        out = out * F.silu(p.z)
    return p.to_sequence_major(out, u.dtype), h.reshape(p.batch, p.dim, p.n).to(A.dtype)


@torch.library.custom_op("vmq::selective_scan", mutates_args=())
@native.builds_on_first_call("selective_scan")
def selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    reverse: bool = False,
    add: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Selective scan; returns ``(out [batch, dim, L] stored as [batch, L, dim], last_state [batch, dim, N])``."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, add)
    if reverse:
        u, delta, B, C, z = _flip_time(u, delta, B, C, z)
    with torch.no_grad():
        out, last = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # out: [batch, L, dim]
    out = out.flip(1) if reverse else out
    if add is not None:
        out = out.add_(add.transpose(1, 2))
    return out.transpose(1, 2), last


def sequence_major(out: Tensor) -> Tensor:
    """A [batch, dim, L] scan output in the op's layout: stored as [batch, L, dim] (a copy unless it already is)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _flip_time(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The pure-torch path's reverse scan: flip the sequence axis (last for u, delta, z, B and C)."""
    return tuple(None if t is None else t.flip(-1) for t in tensors)


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, add=None):
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, add)
    out = u.new_empty(u.shape[0], u.shape[2], u.shape[1]).transpose(1, 2)
    return out, u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=A.dtype)


def _to_groups(grad: Tensor, groups: int) -> Tensor:
    """Sum a [T, batch, G, N] gradient over G when the B/C it belongs to is shared by all groups."""
    return grad if grad.shape[2] == groups else grad.sum(dim=2, keepdim=True)


def _backward(p: _Prepared, grad_out: Tensor, grad_last: Tensor):
    """Reverse-mode scan. Returns gradients in compute dtype, time-major where the inputs were."""
    g, h = p.groups, p.dim // p.groups
    gout = _time_major(grad_out, g, p.cdt)
    chunks = p.chunks()
    # Pass 1: states at chunk starts, so pass 2 can rebuild each chunk's history without storing all of it.
    starts, state = [], p.zero_state()
    for s, e in chunks:
        starts.append(state)
        _, hs = p.states(s, e, state)
        state = hs[-1].clone()

    g_u = torch.zeros_like(p.u)
    g_delta = torch.zeros_like(p.u)
    g_z = None if p.z is None else torch.zeros_like(p.u)
    g_A = torch.zeros_like(p.A)
    g_B = torch.zeros_like(p.B)
    g_C = torch.zeros_like(p.C)
    g_D = None if p.D is None else torch.zeros_like(p.D)
    carry = grad_last.to(p.cdt).reshape(p.batch, g, h, p.n)  # d loss / d h_t arriving from step t+1
    for (s, e), h0 in zip(reversed(chunks), reversed(starts)):
        decay, hs = p.states(s, e, h0)
        gy = gout[s:e]
        if p.z is not None:
            y = p.readout(s, e, hs)
            zc = p.z[s:e]
            sig = torch.sigmoid(zc)
            g_z[s:e] = gy * y * sig * (1 + zc * (1 - sig))
            gy = gy * zc * sig
        if p.D is not None:
            g_D += (gy * p.u[s:e]).sum(dim=(0, 1))
            g_u[s:e] += gy * p.D
        g_C[s:e] += _to_groups(torch.matmul(gy.unsqueeze(-2), hs).squeeze(-2), g_C.shape[2])
        lam = gy.unsqueeze(-1) * p.C[s:e].unsqueeze(3)  # becomes d loss / d h_t in place
        for t in range(e - s - 1, -1, -1):
            lam[t] += carry
            carry = decay[t] * lam[t]
        prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)
        g_exponent = lam * prev * decay  # d loss / d (delta*A)
        dl = p.delta[s:e]
        g_delta[s:e] += (g_exponent * p.A).sum(-1)
        g_A += (g_exponent * dl.unsqueeze(-1)).sum(dim=(0, 1))
        lam_b = torch.matmul(lam, p.B[s:e].unsqueeze(3).transpose(-1, -2)).squeeze(-1)  # sum_n lam * B
        g_delta[s:e] += lam_b * p.u[s:e]
        g_u[s:e] += lam_b * dl
        g_B[s:e] += _to_groups((lam * (dl * p.u[s:e]).unsqueeze(-1)).sum(dim=3), g_B.shape[2])
    return g_u, g_delta, g_A, g_B, g_C, g_D, g_z


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.delta_softplus = inputs[8]
    ctx.reverse = inputs[9]


def _grad_bc(grad: Tensor, like: Tensor) -> Tensor:
    """[L, batch, G|1, N] -> B/C's own layout and dtype."""
    grad = grad.permute(1, 2, 3, 0)
    return (grad.squeeze(1) if like.dim() == 3 else grad).to(like.dtype).contiguous()


def _backward_slice(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, grad_last):
    """Gradients for one batch slice: per-sample ones in the inputs' layouts, A / D / delta_bias ones to be summed."""
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    g_u, g_delta, g_A, g_B, g_C, g_D, g_z = _backward(p, grad_out, grad_last)
    if delta_softplus:
        g_delta = g_delta * torch.sigmoid(p.delta_raw)
    return (
        p.to_channels_first(g_u, u.dtype),
        g_delta.sum(dim=(0, 1)).reshape(p.dim),
        p.to_channels_first(g_delta, delta.dtype),
        g_A.reshape(p.dim, p.n),
        _grad_bc(g_B, B),
        _grad_bc(g_C, C),
        None if g_D is None else g_D.reshape(p.dim),
        None if g_z is None else p.to_channels_first(g_z, z.dtype),
    )


@torch.library.custom_op("vmq::selective_scan_backward", mutates_args=())
@native.builds_on_first_call("selective_scan_backward")
def selective_scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                            z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool,
                            grad_out: Tensor, grad_last: Tensor) -> list[Tensor]:
    """The gradients of ``vmq::selective_scan``'s inputs ``(u, delta, A, B, C, D, z, delta_bias)`` from those of its
    outputs, in the inputs' dtypes and layouts; an empty tensor for an optional input that is absent."""
    if reverse:
        u, delta, B, C, z, grad_out = _flip_time(u, delta, B, C, z, grad_out)
    parts = []
    with torch.no_grad():
        for sl in _batch_slices(u.shape[0], u.shape[1], A.shape[1]):
            parts.append(_backward_slice(u[sl], delta[sl], A, B[sl], C[sl], D, _per_batch(z, sl), delta_bias,
                                         delta_softplus, grad_out[sl], grad_last[sl]))

    def cat(i):
        return None if parts[0][i] is None else torch.cat([q[i] for q in parts])

    def total(i):
        return None if parts[0][i] is None else torch.stack([q[i] for q in parts]).sum(0)

    g_u, g_bias, g_delta, g_A, g_B, g_C, g_D, g_z = cat(0), total(1), cat(2), total(3), cat(4), cat(5), total(6), cat(7)
    if reverse:
        g_u, g_delta, g_B, g_C, g_z = _flip_time(g_u, g_delta, g_B, g_C, g_z)
    return [g_u, g_delta, g_A.to(A.dtype), g_B, g_C, u.new_empty(0) if D is None else g_D.to(D.dtype),
            u.new_empty(0) if z is None else g_z,
            u.new_empty(0) if delta_bias is None else g_bias.to(delta_bias.dtype)]


@selective_scan_backward.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, grad_out, grad_last):
    return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _selective_scan_backward(ctx, grad_out, grad_last):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    if grad_last is None:
        grad_last = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=A.dtype, device=u.device)
    with torch.no_grad():
        grads = torch.ops.vmq.selective_scan_backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                                      ctx.reverse, grad_out, grad_last)
    # add's gradient is the output's (the dispatcher drops trailing arguments left at their defaults: a call without
    # add has fewer inputs)
    needs_add = len(ctx.needs_input_grad) > 10 and ctx.needs_input_grad[10]
    return tuple(g if inputs[i] is not None and ctx.needs_input_grad[i] else None
                 for i, g in enumerate(grads)) + (None, None, grad_out if needs_add else None)


selective_scan_op.register_autograd(_selective_scan_backward, setup_context=_setup_context)


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """Drop-in for ``mamba_ssm``'s ``selective_scan_fn`` that runs everywhere and exports as one node.

    Args:
        u: input, [batch, dim, L].
        delta: time step before bias and softplus, [batch, dim, L].
        A: state matrix, real, [dim, N].
        B: input projection, [batch, N, L] or grouped [batch, G, N, L].
        C: output projection, same forms as ``B``.
        D: skip connection, [dim].
        z: gate, [batch, dim, L]; the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` before the softplus, [dim].
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state [batch, dim, N].
        reverse: run the recurrence from the last position to the first (outputs stay at their positions; the
            final state is the one after position 0).

    Returns:
        ``out`` of shape [batch, dim, L] (stored as [batch, L, dim]) in ``u``'s dtype, or ``(out, last_state)``.

    Example:
        >>> import torch
        >>> from vmq_fx.ops import selective_scan_fn
        >>> u = torch.randn(2, 8, 5); delta = torch.rand(2, 8, 5); A = -torch.rand(8, 4)
        >>> B = torch.randn(2, 4, 5); C = torch.randn(2, 4, 5)
        >>> selective_scan_fn(u, delta, A, B, C, delta_softplus=True).shape
        torch.Size([2, 8, 5])
    """
    out, last_state = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    return (out, last_state) if return_last_state else out
