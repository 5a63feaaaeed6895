"""``vmq::causal_conv1d``: Mamba's depthwise causal convolution (+ SiLU) on a channels-last sequence, as one op.

Mamba runs a depthwise convolution of width K (4) over the ``x`` half of ``in_proj``'s output, padded by ``K - 1`` on
the left so that token ``t`` sees tokens ``t - K + 1 .. t``, then a SiLU. With ``reverse=True`` the convolution is
anti-causal (token ``t`` sees ``t .. t + K - 1``): exactly ``flip(conv(flip(x)))``, which is what Vim's backward
direction computes, without the two flips::

    y[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (K - 1) + k, c]     (reverse: x[b, t + (K - 1) - k, c])
    out = silu(y) if silu else y                                            (out of range x: 0)

Layout: ``x`` and the output are [batch, L, channels] (the layout of ``in_proj``'s output and of ``x_proj``'s input,
so neither side needs a transposed copy); ``weight`` [channels, K] (``nn.Conv1d.weight[:, 0]``); ``bias`` [channels].

Why an op: decomposed into ``pad`` + K multiply-adds + ``silu`` the convolution made ~9 full passes over the
activations and a fifth of a Vim-T forward on a CPU (oneDNN's depthwise convolution was slower still); the C++ kernel
(:mod:`vmq_fx.ops.native`) makes one. Under ``torch.export`` it is one graph node; ONNX export writes it as ``Pad`` +
shifted ``Mul``/``Add`` (``vmq_fx.export.onnx``). The pure-torch implementation below is the reference and the
fallback; the backward is written with the op itself (the gradient of a causal convolution is the anti-causal one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["causal_conv1d_fn", "causal_conv1d_op"]


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"vmq.causal_conv1d: x must be [batch, L, channels], got shape {list(x.shape)}")
    channels = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"vmq.causal_conv1d: weight must be [channels={channels}, K], got shape "
                         f"{list(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != channels):
        raise ValueError(f"vmq.causal_conv1d: bias must be [channels={channels}], got shape {list(bias.shape)}")


@torch.library.custom_op("vmq::causal_conv1d", mutates_args=())
@native.builds_on_first_call("causal_conv1d")
def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """Depthwise (anti-)causal convolution of a [batch, L, channels] sequence, then SiLU when ``silu``."""
    _check_inputs(x, weight, bias)
    kernel, length = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, 0, kernel - 1) if reverse else (0, 0, kernel - 1, 0))  # along L
    taps = weight.t().to(x.dtype)  # [K, channels]
    if reverse:
        taps = taps.flip(0)
    y = padded[:, :length] * taps[0] if bias is None else torch.addcmul(bias.to(x.dtype), padded[:, :length], taps[0])
    for j in range(1, kernel):
        y = torch.addcmul(y, padded[:, j:j + length], taps[j])
    return F.silu(y) if silu else y


@causal_conv1d_op.register_fake
def _(x, weight, bias, silu, reverse):
    _check_inputs(x, weight, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse = silu, reverse


def _weight_grad(x: Tensor, g: Tensor, kernel: int, reverse: bool) -> Tensor:
    """d loss / d weight [channels, K] from the input x and the pre-activation gradient g (both [batch, L, C])."""
    length = x.shape[1]
    padded = F.pad(x, (0, 0, 0, kernel - 1) if reverse else (0, 0, kernel - 1, 0))
    taps = [(g * padded[:, j:j + length]).sum(dim=(0, 1)) for j in range(kernel)]
    grad = torch.stack(taps, dim=1)
    return grad.flip(1) if reverse else grad


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.silu:
        pre = causal_conv1d_op(x, weight, bias, False, ctx.reverse)
        sig = torch.sigmoid(pre)
        grad = grad * sig * (1 + pre * (1 - sig))
    g_x = causal_conv1d_op(grad, weight, None, False, not ctx.reverse) if needs[0] else None
    g_w = _weight_grad(x, grad, weight.shape[1], ctx.reverse).to(weight.dtype) if needs[1] else None
    g_b = grad.sum(dim=(0, 1)).to(bias.dtype) if bias is not None and needs[2] else None
    return g_x, g_w, g_b, None, None


causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = False,
                  reverse: bool = False) -> Tensor:
    """Mamba's depthwise causal convolution on [batch, L, channels], optionally followed by SiLU.

    Args:
        x: [batch, L, channels] (any strides; the channel axis is read contiguously when it is).
        weight: [channels, K], e.g. ``conv.weight[:, 0]`` of a depthwise ``nn.Conv1d``.
        bias: [channels] or ``None``.
        silu: apply SiLU to the result.
        reverse: anti-causal (``flip(conv(flip(x)))`` along L), for a backward-direction scan.

    Returns:
        [batch, L, channels], contiguous.

    Example:
        >>> import torch
        >>> from vmq_fx.ops import causal_conv1d_fn
        >>> conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
        >>> x = torch.randn(2, 5, 6)
        >>> ref = conv(x.transpose(1, 2))[..., :5].transpose(1, 2)
        >>> torch.allclose(causal_conv1d_fn(x, conv.weight[:, 0], conv.bias), ref, atol=1e-6)
        True
    """
    return causal_conv1d_op(x, weight, bias, silu, reverse)
