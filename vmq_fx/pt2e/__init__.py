"""The PT2E quantization backend for Visual Mamba models, laid out as ``torchao.quantization.pt2e``.

======================= ==================================================================================
``quantizer``           :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer`: annotates the linears to quantize
``recipes``             per-layer specs (PTQ4VM integer, ViM-VQ vector) and their registry of families
``rotation``            Hadamard and KLT rotations of a linear's input (MambaQuant-style recipes)
``observers``           the observer / fake-quantize modules ``prepare_pt2e`` inserts
``calibrate``           calibration: smoothing scales, step sizes, codebooks
``blockwise``           block-by-block reconstruction, shared by ``jlss`` (PTQ4VM) and ``vq`` (ViM-VQ)
``lowering``            graph rewrites of a converted model to the vmq ops
``flow``                :func:`~vmq_fx.pt2e.flow.quantize`: export, prepare, calibrate, optimize, convert, lower
``serialization``       save / load of lowered models
``diagnostics``         per-layer errors, bits per weight
``utils``               helpers over a prepared graph
======================= ==================================================================================

Submodules are imported when first used (``vmq_fx.pt2e.recipes`` imports only what it needs).
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("blockwise", "calibrate", "diagnostics", "flow", "jlss", "lowering", "memory", "observers",
               "quantizer", "recipes", "rotation", "serialization", "utils", "vq")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
