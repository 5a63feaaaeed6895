"""``vmq::int8_linear``: a linear layer with per-token static int activations and per-channel int weights.

    y[b, t, :] = ((q(x[b, t] / smooth) - zp[t]) @ W_int^T) * act_scale[t] * w_scale + bias
    q(v)       = clamp(round(v / act_scale[t]) + zp[t], act_qmin, act_qmax)

The CPU implementation quantizes the activation, runs a real integer matmul with int32 accumulation
(``torch._int_mm``) and rescales in float. Unsigned activation levels [0, 255] are shifted by 128 into int8 and the
shift is corrected with the weight's column sums, so the integer result is exact. 4-bit weights are stored two per
byte (:func:`pack_int4`); the op unpacks them before the matmul. A Triton kernel registers itself for CUDA with
``int8_linear.register_kernel("cuda")``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["int8_linear", "int8_linear_reference", "pack_int4", "unpack_int4"]


def pack_int4(w: Tensor) -> Tensor:
    """int8 values in [-8, 7], shape [N, K] -> uint8 [N, ceil(K / 2)]; element 2j in the low nibble, odd K padded
    with a zero."""
    if w.min() < -8 or w.max() > 7:
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    if w.shape[-1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    u = (w.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, k: int | None = None) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, ceil(K / 2)] -> int8 [N, K] (``k`` drops the padding of odd K)."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    w = torch.stack([lo, hi], dim=-1).flatten(-2)
    w = torch.where(w > 7, w - 16, w)
    return w if k is None else w[..., :k]


def _weight_int8(w: Tensor, w_bits: int, k: int) -> Tensor:
    return unpack_int4(w, k) if w_bits <= 4 else w


def _quantize_act(x: Tensor, smooth: Optional[Tensor], act_scale: Tensor, act_zero_point: Tensor, qmin: int,
                  qmax: int) -> Tensor:
    """Float [.., L, K] -> integer levels as float; per token (axis -2)."""
    if smooth is not None:
        # Divide (not multiply by 1/s) so the levels round exactly as in the convert_pt2e reference graph.
        x = x / smooth
    # x * (1 / scale) like quantized_decomposed.quantize_per_channel, so both round the same way.
    inv = (1.0 / act_scale)[:, None]
    return torch.clamp(torch.round(x * inv) + act_zero_point[:, None].to(x.dtype), qmin, qmax)


def _check(x, act_scale, act_zero_point, w, w_scale, w_bits):
    if x.dim() < 2:
        raise ValueError(f"vmq.int8_linear: x must be [..., L, K], got {tuple(x.shape)}")
    length, k = x.shape[-2], x.shape[-1]
    if act_scale.shape != (length,) or act_zero_point.shape != (length,):
        raise ValueError(f"vmq.int8_linear: act_scale / act_zero_point must be [L={length}], got "
                         f"{tuple(act_scale.shape)} / {tuple(act_zero_point.shape)}")
    k_w = (k + 1) // 2 if w_bits <= 4 else k
    if w.shape[1] != k_w or w_scale.shape != (w.shape[0],):
        raise ValueError(f"vmq.int8_linear: weight {tuple(w.shape)} ({w_bits}-bit) and scale {tuple(w_scale.shape)} "
                         f"do not fit x with K={k}")


@torch.library.custom_op("vmq::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor,
    smooth: Optional[Tensor],
    act_scale: Tensor,
    act_zero_point: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    act_qmin: int,
    act_qmax: int,
    w_bits: int,
) -> Tensor:
    """Quantize ``x`` per token, integer matmul with int8 (or packed int4) ``w``, rescale. See the module docstring."""
    _check(x, act_scale, act_zero_point, w, w_scale, w_bits)
    length, k = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    xq = _quantize_act(x.float(), smooth, act_scale.float(), act_zero_point, act_qmin, act_qmax)
    # Unsigned levels up to 255 do not fit int8: shift by 128 and correct with the weight column sums.
    shift = 128 if act_qmax > 127 else 0
    x8 = (xq - shift).to(torch.int8).reshape(-1, k)
    w8 = _weight_int8(w, w_bits, k)
    acc = torch._int_mm(x8, w8.t().contiguous()) if x8.shape[0] > 16 else (x8.int() @ w8.int().t())
    zp = (act_zero_point.to(torch.int32) - shift).repeat(x8.shape[0] // length)
    acc = acc - zp[:, None] * w8.int().sum(dim=1)[None, :]
    out = acc.float() * act_scale.float().repeat(x8.shape[0] // length)[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, length, w.shape[0]).to(x.dtype)


@int8_linear.register_fake
def _(x, smooth, act_scale, act_zero_point, w, w_scale, bias, act_qmin, act_qmax, w_bits):
    _check(x, act_scale, act_zero_point, w, w_scale, w_bits)
    return x.new_empty(*x.shape[:-1], w.shape[0])


def int8_linear_reference(x, smooth, act_scale, act_zero_point, w, w_scale, bias, act_qmin, act_qmax, w_bits):
    """Pure-torch float64 reference: dequantize activation and weight, then a float matmul."""
    xq = _quantize_act(x.double(), None if smooth is None else smooth.double(), act_scale.double(),
                       act_zero_point, act_qmin, act_qmax)
    x_dq = (xq - act_zero_point[:, None].double()) * act_scale.double()[:, None]
    w_dq = _weight_int8(w, w_bits, x.shape[-1]).double() * w_scale.double()[:, None]
    out = x_dq @ w_dq.t()
    if bias is not None:
        out = out + bias.double()
    return out
