"""The plots of ``vmq quantize``'s report (matplotlib, imported lazily); the numbers they show come from
:mod:`vmq_fx.pt2e.diagnostics`."""
from __future__ import annotations

import os

from torch import Tensor

__all__ = ["plot_accuracy_vs_bits", "plot_layer_errors", "plot_token_scales"]


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
