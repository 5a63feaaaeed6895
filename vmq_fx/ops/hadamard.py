"""``vmq::hadamard_transform``: ``x @ kron(odd, H)`` over the last axis, ``H`` the normalized Walsh-Hadamard matrix,
by the fast Walsh-Hadamard transform.

For ``d = m * 2^k`` (the last axis of ``x``) and ``odd`` an ``[m, m]`` matrix (``None``: ``m = 1``)::

    y = x @ kron(odd, H_{2^k}),   H_{2^k}[i, j] = (-1)^popcount(i & j) / sqrt(2^k)   (Sylvester's matrix, normalized)

computed as ``odd^T X H`` on ``X``, the last axis viewed as ``[m, 2^k]``: the Hadamard product is the fast transform
(``k`` add/subtract passes, ``d k`` adds per row instead of the ``d 2^k`` multiply-adds of a matmul by ``H``), the
``m x m`` one ``d m`` multiply-adds. It is the online half of a Hadamard rotation
(:mod:`vmq_fx.pt2e.rotation`): a rotating quantizer multiplies its linear's input by it, the weight side is folded
into the weight at calibration.

Why an op: written as ``unflatten`` -> ``matmul(H)`` -> ``matmul(odd^T)`` -> ``flatten``, the rotation made a lowered
W8A8 Vim-T run at about 0.6x of the unrotated model's speed (``bench/cpu_latency.py --tables rotation`` keeps both
forms); the C++ kernel (:mod:`vmq_fx.ops.native`) does the butterflies in registers, one row at a time. Under
``torch.export`` it is one graph node; ONNX export writes it as ``Reshape`` + ``MatMul`` (standard ops) or one
``vmq.HadamardTransform`` node (vmq_fx's onnxruntime library). The pure-torch implementation below (two matmuls) is
the reference, the fallback and what runs on CUDA (no GPU kernel of its own). The backward is the op itself:
``kron(odd, H)^T = kron(odd^T, H)``; ``odd`` is a constant (no gradient).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["hadamard_transform", "walsh_hadamard"]


def walsh_hadamard(n: int) -> Tensor:
    """Sylvester's ``n x n`` Walsh-Hadamard matrix divided by ``sqrt(n)`` (float64, orthogonal, symmetric).

    Raises:
        ValueError: ``n`` is not a power of two.

    Example:
        >>> walsh_hadamard(2) * 2 ** 0.5
        tensor([[ 1.,  1.],
                [ 1., -1.]], dtype=torch.float64)
    """
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"walsh_hadamard: the size must be a power of two, got {n!r}")
    return _walsh_hadamard(n).clone()


@functools.cache
def _walsh_hadamard(n: int) -> Tensor:  # shared by every call of the op: never handed out
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _check(x: Tensor, odd: Optional[Tensor]) -> None:
    if x.dim() < 1:
        raise ValueError("vmq.hadamard_transform: x must have at least one axis")
    if not x.is_floating_point():
        raise ValueError(f"vmq.hadamard_transform: x must be floating point, got {str(x.dtype)[6:]}")
    if odd is not None and (odd.dim() != 2 or odd.shape[0] != odd.shape[1] or odd.shape[0] < 1):
        raise ValueError(f"vmq.hadamard_transform: odd must be a square [m, m] matrix, got shape {list(odd.shape)}")
    d, m = x.shape[-1], 1 if odd is None else odd.shape[0]
    power = d // m if d % m == 0 else 0
    if power < 1 or power & (power - 1):
        raise ValueError(f"vmq.hadamard_transform: the last axis ({d}) must be {m} x a power of two (odd is "
                         f"[{m}, {m}])")


@torch.library.custom_op("vmq::hadamard_transform", mutates_args=())
@native.builds_on_first_call("hadamard_transform")
def hadamard_transform(x: Tensor, odd: Optional[Tensor]) -> Tensor:
    """``x @ kron(odd, H_{2^k})`` over the last axis (see the module docstring).

    Example:
        >>> import torch
        >>> from vmq_fx.ops.hadamard import hadamard_transform, walsh_hadamard
        >>> x, odd = torch.randn(5, 12, dtype=torch.float64), torch.linalg.qr(torch.randn(3, 3).double()).Q.contiguous()
        >>> bool(torch.allclose(hadamard_transform(x, odd), x @ torch.kron(odd, walsh_hadamard(4))))
        True
    """
    _check(x, odd)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = 1 if odd is None else odd.shape[0]
    h = _walsh_hadamard(x.shape[-1] // m).to(device=x.device, dtype=dtype)
    y = x.to(dtype).unflatten(-1, (m, h.shape[0])) @ h
    if odd is not None:
        y = odd.to(dtype).T @ y
    return y.flatten(-2).to(x.dtype)


@hadamard_transform.register_fake
def _(x, odd):
    _check(x, odd)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.odd = inputs[1]


def _backward(ctx, grad):
    odd = ctx.odd
    return hadamard_transform(grad.contiguous(), None if odd is None else odd.T.contiguous()), None


hadamard_transform.register_autograd(_backward, setup_context=_setup_context)
