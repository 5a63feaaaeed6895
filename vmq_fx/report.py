"""Diagnostics of a quantization run and the plots of ``vmq quantize``'s report (matplotlib, imported lazily).

* :func:`layer_errors`: per quantized linear, the relative error of its output in the fake-quantized model against
  the same layer in the floating-point model, both run on the same images (the quantized model's layer sees the
  quantized model's own input, so errors of earlier layers carry into it).
* :func:`token_scales`: the per-token static activation step sizes of some layers.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, fx

from vmq_fx.calibration import linear_quantizers, set_fake_quant
from vmq_fx.observers import PerTokenStaticFakeQuantize
from vmq_fx.quantizer import quantized_linears

__all__ = ["bits_per_weight", "layer_errors", "plot_accuracy_vs_bits", "plot_layer_errors", "plot_token_scales",
           "token_scales"]


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
            w, w_scale, w_sum = node.args[4], node.args[5], node.args[6]
            tensor = lowered.get_buffer(str(w.target))
            weights += tensor.shape[0] * (tensor.shape[1] * (2 if tensor.dtype == torch.uint8 else 1))
            packed_bits = 4 if node.args[10] <= 4 else 8
            stored[str(w.target)] = tensor.shape[0] * -(-tensor.shape[1] * packed_bits // 8) if (
                tensor.dtype == torch.int8) else tensor.numel()
            for a in (w_scale, w_sum):
                t = lowered.get_buffer(str(a.target))
                stored[str(a.target)] = t.numel() * t.element_size()
        elif node.target is vmq.vq_linear.default:
            codes = lowered.get_buffer(str(node.args[1].target))
            weights += codes.shape[0] * node.args[5]
            for a in node.args[1:4]:
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


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise ImportError("the report's plots need matplotlib: pip install 'vmq-fx[report]'") from e
    return plt


def _finish(plt, fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_errors(before: dict[str, float], after: dict[str, float], path: str | os.PathLike, title: str) -> None:
    """Per-layer relative output error before and after optimization (log scale)."""
    plt = _plt()
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(names)), 3.8))
    ax.plot(range(len(names)), [before[n] for n in names], "o-", ms=3, label="initial (calibrated; VQ: plain k-means)")
    ax.plot(range(len(names)), [after[n] for n in names], "s-", ms=3, label="after optimization")
    ax.set_yscale("log")
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([names[i].replace("layers.", "L").replace(".mixer", "") for i in range(0, len(names), step)],
                       rotation=60, ha="right", fontsize=7)
    _finish(plt, fig, ax, path, "quantized linear (graph order)", "relative output error ||y_q - y|| / ||y||", title,
            legend_size=10)


def plot_token_scales(scales: dict[str, Tensor], path: str | os.PathLike, title: str,
                      class_token: int | None = None) -> None:
    """Per-token activation step size against token position, one line per layer.

    Args:
        scales: layer name -> step size per token position (:func:`token_scales`).
        path: the PNG to write.
        title: the figure's title.
        class_token: position of the class token (Vim's middle token), drawn as a dashed line.
    """
    plt = _plt()
    positions = max(len(s) for s in scales.values())
    long = positions > 40  # markers would hide 197 positions; a wider figure spreads them
    fig, ax = plt.subplots(figsize=(9.6 if long else 6.4, 3.8))
    style = "-" if long else "o-"
    for name, s in scales.items():
        ax.plot(range(len(s)), s.numpy(), style, ms=3, lw=1, label=name)
    if class_token is not None:
        ax.axvline(class_token, color="gray", ls="--", lw=1, label=f"class token ({class_token})")
    ax.set_yscale("log")  # step sizes span about 10x across positions and layers (vim-fm-197: 0.02-0.25)
    _finish(plt, fig, ax, path, "token position", "activation step size", title, legend_size=7)


def plot_accuracy_vs_bits(points: list[tuple[str, float, float]], fp_top1: float, path: str | os.PathLike,
                          title: str) -> None:
    """Top-1 against weight bits per recipe family; ``points`` are (recipe name, weight bits, top-1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    families: dict[str, list[tuple[float, float, str]]] = {}
    for name, bits, top1 in points:
        families.setdefault(name.rsplit("-", 1)[0], []).append((bits, top1, name))
    for family, pts in families.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=family)
        for bits, top1, name in pts:
            ax.annotate(name, (bits, top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp_top1, color="gray", ls="--", label=f"FP32 ({fp_top1:.2f})")
    _finish(plt, fig, ax, path, "weight bits (index bits for VQ)", "top-1 %", title)
