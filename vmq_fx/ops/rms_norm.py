"""``vmq::rms_norm``: RMSNorm over the last axis as one op::

    y = x * rsqrt(mean(x^2, -1) + eps) * weight

Why an op: a graph holds the norm as six operators (``pow``, ``mean``, ``add``, ``rsqrt``, ``mul``, ``mul``: Vim's and
VMamba's ``RMSNorm`` under ``torch.export``), six passes over the activations; the C++ kernel (:mod:`vmq_fx.ops.native`)
makes one, with the same arithmetic (each square rounded, the mean a division by ``d``, ``1 / sqrt``, ``x`` times it
before ``weight``) and only the order of the sum of squares its own (the same on every CPU build and in the
onnxruntime library). The lowering puts it in place of the six (:mod:`vmq_fx.pt2e.lowering.rms_norm`). ONNX export
writes the same six operators (standard ops) or one ``vmq.RmsNorm`` node (vmq_fx's onnxruntime library). The
pure-torch implementation below is the reference, the fallback and what runs on CUDA; the backward differentiates it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["rms_norm", "rms_norm_reference"]


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 1:
        raise ValueError("vmq.rms_norm: x must have at least one axis")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vmq.rms_norm: x must be float32 or float64, got {str(x.dtype)[6:]}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"vmq.rms_norm: weight must be [{x.shape[-1]}] (the last axis of x), got shape "
                         f"{list(weight.shape)}")


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The six operators the op replaces, as a graph of ``RMSNorm`` holds them."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


@torch.library.custom_op("vmq::rms_norm", mutates_args=())
@native.builds_on_first_call("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` over its last axis, times ``weight`` (see the module docstring).

    Example:
        >>> import torch
        >>> from vmq_fx.ops.rms_norm import rms_norm, rms_norm_reference
        >>> x, w = torch.randn(3, 5, 40), torch.rand(40)
        >>> torch.allclose(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-6, atol=1e-6)
        True
    """
    _check(x, weight)
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    _check(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    with torch.enable_grad():
        x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
        g_x, g_w = torch.autograd.grad(rms_norm_reference(x_, w_, ctx.eps), (x_, w_), grad)
    needs = ctx.needs_input_grad
    return g_x if needs[0] else None, g_w.to(weight.dtype) if needs[1] else None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)
