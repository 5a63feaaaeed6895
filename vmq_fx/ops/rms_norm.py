"""``vmq::rms_norm``: RMSNorm over the last axis as one op, and ``vmq::add_rms_norm``: the residual add before it::

    rms_norm(x, weight, eps)               = x * rsqrt(mean(x^2, -1) + eps) * weight
    add_rms_norm(x, residual, weight, eps) = (rms_norm(x + residual, weight, eps), x + residual)

The second is a pre-norm block's front (Vim's ``residual = residual + hidden; norm(residual)``): the sum goes on as the
residual stream, its norm into the block.

Why an op: a graph holds the norm as six operators (``pow``, ``mean``, ``add``, ``rsqrt``, ``mul``, ``mul``: Vim's
``RMSNorm`` under ``torch.export``), six passes over the activations; the C++ kernel (:mod:`vmq_fx.ops.native`)
makes one, with the same arithmetic (each square rounded, the mean a division by ``d``, ``1 / sqrt``, ``x`` times it
before ``weight``) and only the order of the sum of squares its own (the same on every CPU build and in the
onnxruntime library); ``add_rms_norm`` adds in the same pass (a float sum, the same bits as ``aten.add``). The lowering
puts them in place of the six and of the add before them (:mod:`vmq_fx.pt2e.lowering.rms_norm`). ONNX export writes
the same operators (standard ops) or one ``vmq.RmsNorm`` / ``vmq.AddRmsNorm`` node (vmq_fx's onnxruntime library). The
pure-torch implementations below are the reference, the fallback and what runs on CUDA; the backward differentiates
them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_reference"]


def _check(x: Tensor, weight: Tensor, op: str = "rms_norm") -> None:
    if x.dim() < 1:
        raise ValueError(f"vmq.{op}: x must have at least one axis")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vmq.{op}: x must be float32 or float64, got {str(x.dtype)[6:]}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"vmq.{op}: weight must be [{x.shape[-1]}] (the last axis of x), got shape "
                         f"{list(weight.shape)}")


def _check_residual(x: Tensor, residual: Tensor, weight: Tensor) -> None:
    _check(x, weight, "add_rms_norm")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"vmq.add_rms_norm: residual must have x's shape {list(x.shape)} and dtype "
                         f"{str(x.dtype)[6:]}, got {list(residual.shape)} {str(residual.dtype)[6:]}")


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


def _reference_grads(x: Tensor, weight: Tensor, eps: float, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`rms_norm_reference` with respect to ``x`` and ``weight`` (recomputed)."""
    with torch.enable_grad():
        x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
        g_x, g_w = torch.autograd.grad(rms_norm_reference(x_, w_, eps), (x_, w_), grad)
    return g_x, g_w.to(weight.dtype)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g_x, g_w = _reference_grads(x, weight, ctx.eps, grad)
    needs = ctx.needs_input_grad
    return g_x if needs[0] else None, g_w if needs[1] else None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vmq::add_rms_norm", mutates_args=())
@native.builds_on_first_call("add_rms_norm")
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)`` (see the module docstring).

    Example:
        >>> import torch
        >>> from vmq_fx.ops.rms_norm import add_rms_norm, rms_norm
        >>> x, r, w = torch.randn(3, 5, 40), torch.randn(3, 5, 40), torch.rand(40)
        >>> out, total = add_rms_norm(x, r, w, 1e-5)
        >>> torch.equal(total, x + r), torch.equal(out, rms_norm(x + r, w, 1e-5))
        (True, True)
    """
    _check_residual(x, residual, weight)
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _check_residual(x, residual, weight)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _setup_add_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _add_backward(ctx, grad_out, grad_total):
    total, weight = ctx.saved_tensors
    g_t, g_w = _reference_grads(total, weight, ctx.eps, grad_out)
    g_t = g_t + grad_total  # the sum is an output too: x and residual get both gradients
    needs = ctx.needs_input_grad
    return g_t if needs[0] else None, g_t if needs[1] else None, g_w if needs[2] else None, None


add_rms_norm.register_autograd(_add_backward, setup_context=_setup_add_context)
