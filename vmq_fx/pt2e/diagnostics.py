"""Diagnostics of a quantization run.

* :func:`bits_per_weight`: the stored size of a lowered model's quantized linears, in bits per weight.
* :func:`layer_errors`: per quantized linear, the relative error of its output in the fake-quantized model against
  the same layer in the floating-point model, both run on the same images (the quantized model's layer sees the
  quantized model's own input, so errors of earlier layers carry into it).
* :func:`token_scales`: the per-token static activation step sizes of some layers.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.ops.vq_linear import VQLinearArgs
from vmq_fx.pt2e.observers import PerTokenStaticFakeQuantize
from vmq_fx.pt2e.quantizer import quantized_linears
from vmq_fx.pt2e.utils import linear_quantizers, set_fake_quant

__all__ = ["bits_per_weight", "layer_errors", "token_scales"]


class _LinearRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.outputs: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.outputs[n.name] = out.detach()
        return out


def bits_per_weight(lowered: fx.GraphModule) -> float:
    """All-in storage of the quantized linears of a lowered model, in bits per weight, as a saved file holds them:
    integer weights (4-bit ones packed two per byte) with their per-row scales and column sums, or VQ codes with
    their codebooks and row scales. A tensor shared by several linears (a shared codebook) counts once.

    Example:
        >>> import torch, vmq_fx
        >>> model = vmq_fx.models.create_model("vim_fm_tiny").eval()
        >>> res = vmq_fx.quantize(model, vmq_fx.recipes.per_tensor_static(8, 8), torch.randn(8, 1, 28, 28),
        ...                       progress=False)
        >>> round(bits_per_weight(res.lowered), 2)  # 8-bit weights, with a float scale and column sum per row
        8.83
    """
    stored: dict[str, int] = {}  # attribute -> bytes as saved
    weights = 0
    vmq = torch.ops.vmq
    for node in lowered.graph.nodes:
        if node.target is vmq.int8_linear.default:
            args = Int8LinearArgs.from_node(node)
            tensor = lowered.get_buffer(str(args.w.target))
            weights += tensor.shape[0] * (tensor.shape[1] * (2 if tensor.dtype == torch.uint8 else 1))
            packed_bits = 4 if args.w_bits <= 4 else 8
            stored[str(args.w.target)] = tensor.shape[0] * -(-tensor.shape[1] * packed_bits // 8) if (
                tensor.dtype == torch.int8) else tensor.numel()
            for a in (args.w_scale, args.w_sum):
                t = lowered.get_buffer(str(a.target))
                stored[str(a.target)] = t.numel() * t.element_size()
        elif node.target is vmq.vq_linear.default:
            args = VQLinearArgs.from_node(node)
            codes = lowered.get_buffer(str(args.codes.target))
            weights += codes.shape[0] * args.in_features
            for a in (args.codes, args.codebook, args.row_scale):
                t = lowered.get_buffer(str(a.target))
                stored[str(a.target)] = t.numel() * t.element_size()
    if not weights:
        raise ValueError("bits_per_weight: no vmq.int8_linear / vmq.vq_linear node; lower the model first")
    return 8 * sum(stored.values()) / weights


@torch.no_grad()
def layer_errors(prepared: fx.GraphModule, images: Tensor) -> dict[str, float]:
    """``{layer module path: ||y_q - y|| / ||y||}`` for every quantized linear of a calibrated prepared model."""
    layers = quantized_linears(prepared)
    quantizers = linear_quantizers(prepared)
    runs = {}
    for fake_quant in (False, True):
        set_fake_quant(quantizers, fake_quant)
        rec = _LinearRecorder(prepared, set(layers))
        rec.run(images)
        runs[fake_quant] = rec.outputs
    set_fake_quant(quantizers, True)
    return {layers[n].name: ((runs[True][n] - runs[False][n]).norm() / runs[False][n].norm().clamp_min(1e-12)).item()
            for n in layers}


def token_scales(prepared: fx.GraphModule, limit: int = 4) -> dict[str, Tensor]:
    """Per-token activation step sizes of the first and last blocks' quantized linears (up to ``limit`` layers)."""
    entries = [(layer, act) for layer, act, _ in linear_quantizers(prepared).values()
               if isinstance(act, PerTokenStaticFakeQuantize) and act.initialized]
    if not entries:
        return {}
    picked = entries[: limit // 2] + entries[-(limit - limit // 2):]
    return {layer.name: act.scale.detach().clone() for layer, act in picked}
