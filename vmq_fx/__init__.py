"""vmq_fx: post-training quantization and export of Visual Mamba models on torch.export and torchao PT2E.

The package is laid out as torchao's PT2E quantization is:

* :mod:`vmq_fx.pt2e`: the backend: :class:`VisualMambaQuantizer`, the recipes, observers, calibration, the block-wise
  optimizations (JLSS, ViM-VQ) and the lowering of a converted graph to the vmq ops;
* :mod:`vmq_fx.ops`: the ops (``torch.ops.vmq.*``), one module each, with their CPU (C++) and CUDA (Triton) kernels;
* :mod:`vmq_fx.models` and :mod:`vmq_fx.export`: exportable Visual Mamba models, ``torch.export`` and ONNX;
* :mod:`vmq_fx.app`: the ``vmq`` command line and its workloads (data, evaluation, training, reports).

Importing the package imports none of them: each name below is imported when first used, so that ``vmq --help`` and
tools that only look at the package start at once.

Example:
    >>> import vmq_fx
    >>> vmq_fx.VisualMambaQuantizer.__module__
    'vmq_fx.pt2e.quantizer'
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "prepare_pt2e": "torchao.quantization.pt2e.quantize_pt2e",
    "convert_pt2e": "torchao.quantization.pt2e.quantize_pt2e",
    "VisualMambaQuantizer": "vmq_fx.pt2e.quantizer",
    "PTQ4VMRecipe": "vmq_fx.pt2e.recipes",
    "VQRecipe": "vmq_fx.pt2e.recipes",
    "calibrate": "vmq_fx.pt2e.calibrate",
    "jlss": "vmq_fx.pt2e.jlss",
    "JLSSConfig": "vmq_fx.pt2e.jlss",
    "JLSSReport": "vmq_fx.pt2e.jlss",
    "vector_quantize": "vmq_fx.pt2e.vq",
    "VQConfig": "vmq_fx.pt2e.vq",
    "VQReport": "vmq_fx.pt2e.vq",
    "lower": "vmq_fx.pt2e.lowering",
    "quantize": "vmq_fx.pt2e.flow",
    "QuantizeResult": "vmq_fx.pt2e.flow",
    "save_quantized": "vmq_fx.pt2e.serialization",
    "load_quantized": "vmq_fx.pt2e.serialization",
    "adapt_mamba_ssm": "vmq_fx.models.mamba_ssm",
    "export_model": "vmq_fx.export.program",
    "export_onnx": "vmq_fx.export.onnx",
}
# public name -> a module exposed under it
_MODULES = {
    "app": "vmq_fx.app",
    "export": "vmq_fx.export",
    "models": "vmq_fx.models",
    "ops": "vmq_fx.ops",
    "pt2e": "vmq_fx.pt2e",
    "recipes": "vmq_fx.pt2e.recipes",
}

__all__ = sorted([*_EXPORTS, *_MODULES])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'vmq_fx' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what static tools see
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401

    from vmq_fx import app, export, models, ops, pt2e  # noqa: F401
    from vmq_fx.export.onnx import export_onnx  # noqa: F401
    from vmq_fx.export.program import export_model  # noqa: F401
    from vmq_fx.models.mamba_ssm import adapt_mamba_ssm  # noqa: F401
    from vmq_fx.pt2e import recipes  # noqa: F401
    from vmq_fx.pt2e.calibrate import calibrate  # noqa: F401
    from vmq_fx.pt2e.flow import QuantizeResult, quantize  # noqa: F401
    from vmq_fx.pt2e.jlss import JLSSConfig, JLSSReport, jlss  # noqa: F401
    from vmq_fx.pt2e.lowering import lower  # noqa: F401
    from vmq_fx.pt2e.quantizer import VisualMambaQuantizer  # noqa: F401
    from vmq_fx.pt2e.recipes import PTQ4VMRecipe, VQRecipe  # noqa: F401
    from vmq_fx.pt2e.serialization import load_quantized, save_quantized  # noqa: F401
    from vmq_fx.pt2e.vq import VQConfig, VQReport, vector_quantize  # noqa: F401
