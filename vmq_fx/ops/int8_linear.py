"""``vmq::int8_linear``: a linear layer with per-token int activations and per-channel int weights.

    y[b, t, :] = ((q(x[b, t] / smooth) - zp[t]) @ W_int^T) * act_scale[t] * w_scale + bias
    q(v)       = clamp(round(v * (1 / act_scale[t])) + zp[t], act_qmin, act_qmax)      (round half to even)

Static (PTQ4VM): ``act_scale`` / ``act_zero_point`` are calibrated, one per token position ``[L]``. Dynamic (the
per-token dynamic baseline): both are ``None`` and each row ``x[b, t]`` gets its own min-max parameters at run time,
as torchao's ``choose_qparams_affine`` (asymmetric, ``eps`` = float32 epsilon) computes them in float32:

    scale[b, t] = max((max(x[b, t], 0) - min(x[b, t], 0)) / (act_qmax - act_qmin), eps)
    zp[b, t]    = clamp(act_qmin - round(min(x[b, t], 0) / scale[b, t]), act_qmin, act_qmax)

Unsigned activation levels [0, 255] are shifted by 128 into int8, multiplied with int32 accumulation, and the shift and
the zero points are corrected with the weight's column sums ``w_sum = W_int.sum(1)``, which the lowering computes once
(:func:`prepare_weight`). The product is ``torch._int_mm`` (oneDNN) where the CPU has int8 dot-product instructions
(the C++ kernel's AVX-512 build multiplies uint8 x int8 itself there, with ``vpdpbusd`` or on AMX tiles: the same
integers). Without
them (``vmq_fx.ops.native.int8_gemm_path``: ``torch._int_mm`` is then slow, and under a capped oneDNN wrong) x86 builds
multiply int16 levels in the C++ kernel (``"int16"``, the same integers; the pure-torch implementation gets them from a
float GEMM in which they are exact), and ARM64 builds take the fp32 GEMM on the dequantized levels and weight, as the
Q/DQ reference graph computes (``"float"``: float rounding apart, the same result).

The weight is int8 ``[N, K]`` whatever ``w_bits`` is (the form that runs without per-call work), or, for weights of
4 bits or fewer, uint8 ``[N, ceil(K / 2)]`` packed two per byte (:func:`pack_int4`), the form files store: saved
models and ONNX files keep 4-bit weights packed and unpack them when loaded.

Implementations: the fused C++ kernel of :mod:`vmq_fx.ops.native` on CPU (one pass to quantize, the integer GEMM,
one pass to rescale; small products, few rows and tiny K in one pass of its own, the levels multiplied as floats,
exactly), registered in the dispatcher over the pure-torch implementation below (which stays the
reference and the fallback); a Triton kernel on CUDA (``int8_linear.register_kernel("cuda")``). All give the same
integer levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from vmq_fx.ops import native
from vmq_fx.ops._no_backward import register_no_backward
from vmq_fx.ops._schema import NamedArguments

__all__ = ["Int8LinearArgs", "dynamic_token_qparams", "int8_linear", "int8_linear_reference", "pack_int4",
           "prepare_weight", "unpack_int4"]


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


def prepare_weight(w_int: Tensor) -> tuple[Tensor, Tensor]:
    """The weight of an integer linear as the op runs it, and its column sums: ``(int8 [N, K], int32 [N])``.

    Example:
        >>> w, w_sum = prepare_weight(torch.tensor([[1, -2, 3]]))
        >>> w.dtype, w_sum.tolist()
        (torch.int8, [2])
    """
    w_int = w_int.to(torch.int8).contiguous()
    return w_int, w_int.to(torch.int32).sum(dim=1, dtype=torch.int32)


def is_packed(w: Tensor) -> bool:
    """Whether an ``int8_linear`` weight is in the packed 4-bit form."""
    return w.dtype == torch.uint8


def _weight_int8(w: Tensor, k: int) -> Tensor:
    return unpack_int4(w, k) if is_packed(w) else w


def _check(x, act_scale, act_zero_point, w, w_scale, w_sum, w_bits):
    if x.dim() < 2:
        raise ValueError(f"vmq.int8_linear: x must be [..., L, K], got {list(x.shape)}")
    length, k = x.shape[-2], x.shape[-1]
    if (act_scale is None) != (act_zero_point is None):
        raise ValueError("vmq.int8_linear: act_scale and act_zero_point are both given (static) or both None "
                         "(per-token dynamic)")
    if act_scale is not None and (act_scale.shape != (length,) or act_zero_point.shape != (length,)):
        raise ValueError(f"vmq.int8_linear: act_scale / act_zero_point must be [L={length}], got "
                         f"{list(act_scale.shape)} / {list(act_zero_point.shape)}")
    if is_packed(w) and w_bits > 4:
        raise ValueError(f"vmq.int8_linear: a packed (uint8) weight holds 4-bit values, but w_bits={w_bits}")
    k_w = (k + 1) // 2 if is_packed(w) else k
    if w.shape[1] != k_w or w_scale.shape != (w.shape[0],) or w_sum.shape != (w.shape[0],):
        raise ValueError(f"vmq.int8_linear: weight {list(w.shape)} ({w_bits}-bit), scale {list(w_scale.shape)} and "
                         f"column sums {list(w_sum.shape)} do not fit x with K={k}")


def _product_path() -> str:
    """How the integer product runs on this CPU (``native.int8_gemm_path``, or the path the kernels were set to)."""
    kernels = native.native_kernels()
    return kernels.int8_gemm() if kernels is not None else native.int8_gemm_path()[0]


def dynamic_token_qparams(x: Tensor, act_qmin: int, act_qmax: int) -> tuple[Tensor, Tensor]:
    """Per-row min-max parameters ``(scale float32 [...], zero point int32 [...])`` of ``x [..., K]``, in float32 as
    torchao's ``choose_qparams_affine`` computes them (asymmetric, the range widened to hold 0, ``eps`` = float32
    epsilon): what a dynamic ``vmq::int8_linear`` quantizes each row with.

    Example:
        >>> scale, zp = dynamic_token_qparams(torch.tensor([[-1.0, 0.0, 3.0]]), 0, 255)
        >>> round(float(scale[0]) * 255, 4), int(zp[0])
        (4.0, 64)
    """
    x = x.float()
    lo = torch.clamp(x.amin(-1), max=0.0)
    hi = torch.clamp(x.amax(-1), min=0.0)
    scale = torch.clamp((hi - lo) / float(act_qmax - act_qmin), min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(act_qmin - torch.round(lo / scale), act_qmin, act_qmax)
    return scale, zp.to(torch.int32)


def _int8_linear_torch(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax, w_bits):
    length, k = x.shape[-2], x.shape[-1]
    x = x.float().reshape(-1, length, k)
    if smooth is not None:
        # Divide (not multiply by 1/s) so the levels round exactly as in the convert_pt2e reference graph.
        x = x / smooth
    if act_scale is None:  # per-token dynamic: one scale and zero point per row
        scale, zp = dynamic_token_qparams(x, act_qmin, act_qmax)
    else:
        scale, zp = act_scale.float().expand(x.shape[0], length), act_zero_point.to(torch.int32).expand(x.shape[0],
                                                                                                          length)
    scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    # x * (1 / scale) like quantized_decomposed.quantize_per_channel, so both round the same way.
    xq = torch.clamp(torch.round(x.reshape(-1, k) * (1.0 / scale)) + zp.float(), act_qmin, act_qmax)
    w8 = _weight_int8(w, k)
    path = _product_path()
    if path == "float":  # dequantized levels times the dequantized weight, as the C++ kernel's float path
        x_dq = (xq - zp.float()) * scale
        w_dq = w8.float() * w_scale.float()[:, None]
        return torch.nn.functional.linear(x_dq, w_dq, None if bias is None else bias.float())
    if path == "int16":
        # Without int8 dot products: the same integers from the float GEMM, where every partial sum is an integer of at
        # most K (qmax - qmin) 128, exact in float32 up to 2^24 and in float64 beyond.
        span = max(act_qmax - act_qmin, int((act_qmax - zp).max()), int((zp - act_qmin).max()))
        exact = torch.float32 if k * span * 128 <= 2 ** 24 else torch.float64
        acc = ((xq - zp.float()).to(exact) @ w8.to(exact).t()).to(torch.int32)
    else:
        # Unsigned levels up to 255 do not fit int8: shift by 128 and correct with the weight column sums.
        shift = 128 if act_qmax > 127 else 0
        x8 = (xq - shift).to(torch.int8)
        # torch._int_mm needs more than 16 rows, and with one input channel its transposed weight ([1, N], strides
        # (1, 1)) comes back wrong (torch 2.13, oneDNN): those take the exact int32 product.
        int_mm = x8.shape[0] > 16 and k > 1
        acc = torch._int_mm(x8, w8.t()) if int_mm else (x8.int() @ w8.int().t())
        acc = acc - (zp - shift) * w_sum.to(torch.int32)[None, :]
    out = acc.float() * scale * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out


@torch.library.custom_op("vmq::int8_linear", mutates_args=())
@native.builds_on_first_call("int8_linear")
def int8_linear(
    x: Tensor,
    smooth: Optional[Tensor],
    act_scale: Optional[Tensor],
    act_zero_point: Optional[Tensor],
    w: Tensor,
    w_scale: Tensor,
    w_sum: Tensor,
    bias: Optional[Tensor],
    act_qmin: int,
    act_qmax: int,
    w_bits: int,
) -> Tensor:
    """Quantize ``x`` per token (static parameters, or dynamic ones where ``act_scale`` / ``act_zero_point`` are
    ``None``), integer matmul with int8 (or packed 4-bit) ``w``, rescale. See the module docstring."""
    _check(x, act_scale, act_zero_point, w, w_scale, w_sum, w_bits)
    out = _int8_linear_torch(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax,
                             w_bits)
    return out.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


@int8_linear.register_fake
def _(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax, w_bits):
    _check(x, act_scale, act_zero_point, w, w_scale, w_sum, w_bits)
    return x.new_empty(*x.shape[:-1], w.shape[0])


register_no_backward(int8_linear, "int8_linear")


@dataclass(frozen=True)
class Int8LinearArgs(NamedArguments):
    """The arguments of one ``vmq::int8_linear`` call by name (graph nodes or values), as the schema above declares
    them: what the lowering writes (:meth:`as_args`) and what the passes, the report and the exporters read
    (:meth:`from_node`) instead of positions."""

    op: ClassVar = torch.ops.vmq.int8_linear.default

    x: Any
    smooth: Any
    act_scale: Any
    act_zero_point: Any
    w: Any
    w_scale: Any
    w_sum: Any
    bias: Any
    act_qmin: int
    act_qmax: int
    w_bits: int


def int8_linear_reference(x, smooth, act_scale, act_zero_point, w_int, w_scale, bias, act_qmin, act_qmax):
    """Float64 reference written independently of the op: quantize per token as ``quantize_per_channel(axis=-2)``
    specifies (the levels are computed in float32, as the spec rounds them), dequantize both operands, and multiply in
    float64. Dynamic (``act_scale`` None): the per-row parameters from torchao's ``choose_qparams_affine`` and the
    levels from its ``quantize_affine`` (the ops of the ``convert_pt2e`` graph).

    Args:
        w_int: the integer weight [N, K] (not packed), values in the weight's level range.
    """
    xs = x.float() if smooth is None else x.float() / smooth.float()
    if act_scale is None:
        from torchao.quantization.quant_primitives import choose_qparams_affine, quantize_affine
        from torchao.quantization.quant_primitives import MappingType

        block = [1] * (xs.dim() - 1) + [xs.shape[-1]]
        scale, zp = choose_qparams_affine(xs, MappingType.ASYMMETRIC, block, torch.uint8, act_qmin, act_qmax,
                                          torch.finfo(torch.float32).eps, torch.float32, torch.int32)
        levels = quantize_affine(xs, block, scale, zp, torch.int32, act_qmin, act_qmax).double()
        scale, zp = scale.reshape(xs.shape[:-1]), zp.reshape(xs.shape[:-1])
        x_dq = (levels - zp.double().unsqueeze(-1)) * scale.double().unsqueeze(-1)
    else:
        levels = torch.round(xs * (1.0 / act_scale.float()).unsqueeze(-1)) + act_zero_point.float().unsqueeze(-1)
        levels = levels.clamp(act_qmin, act_qmax).double()
        x_dq = (levels - act_zero_point.double().unsqueeze(-1)) * act_scale.double().unsqueeze(-1)
    out = torch.einsum("...k,nk->...n", x_dq, w_int.double() * w_scale.double().unsqueeze(-1))
    return out if bias is None else out + bias.double()
