"""``vmq::vq_dequantize`` and ``vmq::vq_linear``: linears whose weight is vector-quantized (ViM-VQ).

An ``[N, K]`` weight with sub-vector length ``d`` and a codebook of ``k`` codewords is stored as

* ``codebook``  ``[k, d]`` (float16 in the saved model);
* ``codes``     ``uint8 [N, ceil(S * b / 8)]``: row ``n``'s ``S = ceil(K / d)`` codeword indices of ``b =
  ceil(log2 k)`` bits each, as a little-endian bitstream (:func:`pack_codes`), so a code costs exactly ``b`` bits;
* ``row_scale`` ``uint8 [N]``: one scale per output row (the codebook is shared by rows of different magnitude) in an
  8-bit logarithmic code, ``2^(c / 16 - 12)`` (:func:`decode_row_scale`): scales from 2^-12 to 2^3.94 in steps of
  4.4 %, so a row scale costs 8 bits and needs no per-layer range.

and decodes as ``W[n] = decode_row_scale(row_scale[n]) * concat_s(codebook[code[n, s]])[:K]`` (the last sub-vector
of a row is zero-padded when ``d`` does not divide ``K``). ``vq_linear(x, ...) = x @ W^T + bias``.

Implementations: on CPU the C++ kernel of :mod:`vmq_fx.ops.native` (registered in the dispatcher over the pure-torch
one) decodes the codes straight into the float weight (one pass, no index tensors) and multiplies once; a Triton
kernel decodes inside the GEMM on CUDA (``vq_linear.register_kernel("cuda")``); the pure-torch implementation, the
reference and the fallback, decodes ``_ROWS`` output rows at a time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from vmq_fx.ops import native
from vmq_fx.ops._no_backward import register_no_backward
from vmq_fx.ops._schema import NamedArguments

__all__ = ["VQLinearArgs", "code_bits", "decode_row_scale", "encode_row_scale", "pack_codes", "unpack_codes",
           "vq_dequantize", "vq_linear", "vq_linear_reference"]

_ROWS = 256  # output rows decoded per slice by the CPU implementation
# The row-scale code: scale = 2^(code * _RS_STEP + _RS_MIN_LOG2). The C++ kernel (csrc/vq_linear.cpp), the Triton
# wrapper and the ONNX translation decode with the same constants.
_RS_STEP, _RS_MIN_LOG2 = 1.0 / 16, -12.0


def encode_row_scale(scale: Tensor) -> Tensor:
    """Positive row scales -> their nearest 8-bit logarithmic codes (``uint8``), clamped to [2^-12, 2^3.94].

    Example:
        >>> scales = torch.tensor([0.01, 0.5, 1.0])
        >>> encode_row_scale(scales)
        tensor([ 86, 176, 192], dtype=torch.uint8)
        >>> bool(((decode_row_scale(encode_row_scale(scales)) / scales - 1).abs() < 0.022).all())  # 2^(1/32) - 1
        True
    """
    code = ((scale.float().clamp_min(1e-30).log2() - _RS_MIN_LOG2) / _RS_STEP).round()
    return code.clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _row_scales(device: torch.device) -> Tensor:
    """Every code's scale, once per device (the C++ kernel builds the same table with the same op, so both decode
    alike; the CUDA path does not copy it to the device on every call)."""
    return torch.exp2(torch.arange(256, dtype=torch.float32) * _RS_STEP + _RS_MIN_LOG2).to(device)


def decode_row_scale(code: Tensor) -> Tensor:
    """``uint8`` row-scale codes -> float32 scales ``2^(code / 16 - 12)``."""
    return _row_scales(code.device)[code.long()]


def code_bits(k: int) -> int:
    """Bits of one codeword index for a codebook of ``k`` entries."""
    return max(1, math.ceil(math.log2(k)))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes ``[N, S]`` in ``[0, 2^bits)`` -> ``uint8 [N, ceil(S * bits / 8)]`` (bitstream per row)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes: codes must be [rows, codes_per_row], got {list(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"pack_codes: codes must lie in [0, {1 << bits}) for {bits} bits")
    rows, per_row = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    stream = ((codes.long()[..., None] >> torch.arange(bits, device=codes.device)) & 1).reshape(rows, per_row * bits)
    stream = torch.nn.functional.pad(stream, (0, -stream.shape[1] % 8))
    return (stream.reshape(rows, -1, 8) << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, per_row: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [N, bytes]`` -> ``int64 [N, per_row]``."""
    if bits == 8:
        return packed[:, :per_row].long()
    stream = ((packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1).reshape(packed.shape[0], -1)
    stream = stream[:, : per_row * bits].reshape(packed.shape[0], per_row, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def _check(codes: Tensor, codebook: Tensor, row_scale: Tensor, in_features: int) -> tuple[int, int]:
    if codebook.dim() != 2:
        raise ValueError(f"vmq.vq_linear: codebook must be [k, d], got {list(codebook.shape)}")
    k, d = codebook.shape
    bits, per_row = code_bits(k), -(-in_features // d)
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[1] != -(-per_row * bits // 8):
        raise ValueError(f"vmq.vq_linear: codes must be uint8 [N, {-(-per_row * bits // 8)}] for K={in_features}, "
                         f"d={d}, k={k}; got {str(codes.dtype).removeprefix('torch.')} {list(codes.shape)}")
    if row_scale.shape != (codes.shape[0],) or row_scale.dtype != torch.uint8:
        raise ValueError(f"vmq.vq_linear: row_scale must be uint8 [N={codes.shape[0]}] (encode_row_scale), got "
                         f"{str(row_scale.dtype).removeprefix('torch.')} {list(row_scale.shape)}")
    return bits, per_row


def _decode(codes: Tensor, codebook: Tensor, row_scale: Tensor, in_features: int, bits: int, per_row: int) -> Tensor:
    idx = unpack_codes(codes, bits, per_row)
    w = codebook.float()[idx].reshape(codes.shape[0], -1)[:, :in_features]
    return w * decode_row_scale(row_scale)[:, None]


@torch.library.custom_op("vmq::vq_dequantize", mutates_args=())
@native.builds_on_first_call("vq_dequantize")
def vq_dequantize(codes: Tensor, codebook: Tensor, row_scale: Tensor, in_features: int) -> Tensor:
    """The float32 ``[N, K]`` weight the codes stand for (the reference form that ``convert_pt2e`` writes)."""
    bits, per_row = _check(codes, codebook, row_scale, in_features)
    return _decode(codes, codebook, row_scale, in_features, bits, per_row)


@vq_dequantize.register_fake
def _(codes, codebook, row_scale, in_features):
    _check(codes, codebook, row_scale, in_features)
    return codebook.new_empty(codes.shape[0], in_features, dtype=torch.float32)


@torch.library.custom_op("vmq::vq_linear", mutates_args=())
@native.builds_on_first_call("vq_linear")
def vq_linear(x: Tensor, codes: Tensor, codebook: Tensor, row_scale: Tensor, bias: Optional[Tensor],
              in_features: int) -> Tensor:
    """``x @ W^T + bias`` with ``W`` decoded from ``codes``/``codebook``/``row_scale``."""
    bits, per_row = _check(codes, codebook, row_scale, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"vmq.vq_linear: x has {x.shape[-1]} features, the weight {in_features}")
    x2 = x.reshape(-1, in_features).float()
    out = x2.new_empty(x2.shape[0], codes.shape[0])
    for r in range(0, codes.shape[0], _ROWS):
        w = _decode(codes[r:r + _ROWS], codebook, row_scale[r:r + _ROWS], in_features, bits, per_row)
        torch.matmul(x2, w.t(), out=out[:, r:r + _ROWS])
    if bias is not None:
        out += bias.float()
    return out.reshape(*x.shape[:-1], codes.shape[0]).to(x.dtype)


@vq_linear.register_fake
def _(x, codes, codebook, row_scale, bias, in_features):
    _check(codes, codebook, row_scale, in_features)
    return x.new_empty(*x.shape[:-1], codes.shape[0])


register_no_backward(vq_dequantize, "vq_dequantize")
register_no_backward(vq_linear, "vq_linear")


@dataclass(frozen=True)
class VQLinearArgs(NamedArguments):
    """The arguments of one ``vmq::vq_linear`` call by name (graph nodes or values), as its schema declares them."""

    op: ClassVar = torch.ops.vmq.vq_linear.default

    x: Any
    codes: Any
    codebook: Any
    row_scale: Any
    bias: Any
    in_features: int


def vq_linear_reference(x, codes, codebook, row_scale, bias, in_features):
    """Pure-torch float64 reference: decode the whole weight with a direct loop-free gather, then matmul."""
    k, d = codebook.shape
    bits, per_row = code_bits(k), -(-in_features // d)
    # Independent of unpack_codes: read each code's bits one by one from the byte stream.
    flat = codes.long()
    idx = torch.zeros(codes.shape[0], per_row, dtype=torch.long)
    for s in range(per_row):
        for b in range(bits):
            pos = s * bits + b
            idx[:, s] |= ((flat[:, pos // 8] >> (pos % 8)) & 1) << b
    scale = torch.pow(2.0, row_scale.double() / 16.0 - 12.0)  # written out, not decode_row_scale
    w = codebook.double()[idx].reshape(codes.shape[0], -1)[:, :in_features] * scale[:, None]
    out = x.double() @ w.t()
    return out if bias is None else out + bias.double()
