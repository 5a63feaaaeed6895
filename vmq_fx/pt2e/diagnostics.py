"""Diagnostics of a quantization run.

* :func:`bits_per_weight`: the stored size of a lowered model's quantized linears, in bits per weight.
* :func:`bits_per_activation`: the activation bits its integer linears quantize, per input channel.
* :func:`layer_errors`: per quantized linear, the relative error of its output in the fake-quantized model against
  the same layer in the floating-point model, both run on the same images (the quantized model's layer sees the
  quantized model's own input, so errors of earlier layers carry into it).
* :func:`token_scales`: the per-token static activation step sizes of some layers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, fx

from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.ops.vq_linear import VQLinearArgs
from vmq_fx.pt2e.observers import PerTokenStaticFakeQuantize
from vmq_fx.pt2e.observers.fake_quantize import OUTLIER_META, ROTATION_META
from vmq_fx.pt2e.quantizer import quantized_linears
from vmq_fx.pt2e.utils import linear_quantizers, set_fake_quant

__all__ = ["bits_per_activation", "bits_per_weight", "layer_errors", "token_scales"]


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
    integer weights (4-bit ones packed two per byte) with their per-row scales and column sums (and the float32
    matrices of the rotations in front of rotated linears, each once), or VQ codes with their codebooks and row scales. A tensor shared by several linears (a shared codebook) counts once.

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
            if not node.meta.get(OUTLIER_META):  # an outlier-channel part stores more of the same linear's weights
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
    for node in lowered.graph.nodes:  # rotations' matrices (a Hadamard one's factors: once per size)
        if node.meta.get(ROTATION_META):
            for a in node.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    t = lowered.get_buffer(str(a.target))
                    stored[str(a.target)] = t.numel() * t.element_size()
    if not weights:
        raise ValueError("bits_per_weight: no vmq.int8_linear / vmq.vq_linear node; lower the model first")
    return 8 * sum(stored.values()) / weights


def bits_per_activation(lowered: fx.GraphModule) -> float:
    """The activation bits the integer linears of a lowered model quantize, per input channel of the model's linears:
    ``a_bits`` for a plain linear; with outlier channels ``a_bits + 8 k / K`` (the main op quantizes all ``K``
    channels, its 8-bit part the ``k`` outlier channels again).

    Raises:
        ValueError: no ``vmq.int8_linear`` in the graph.
    """
    bits = channels = 0.0
    for node in lowered.graph.nodes:
        if node.target is torch.ops.vmq.int8_linear.default:
            args = Int8LinearArgs.from_node(node)
            w = lowered.get_buffer(str(args.w.target))
            k = w.shape[1] * (2 if w.dtype == torch.uint8 else 1)  # int8, or 4-bit packed two per byte
            bits += k * math.log2(args.act_qmax - args.act_qmin + 1)
            channels += 0 if node.meta.get(OUTLIER_META) else k
    if not channels:
        raise ValueError("bits_per_activation: no vmq.int8_linear node; lower an integer-quantized model first")
    return bits / channels


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
