"""The vmq ops (``torch.ops.vmq.*``), one module each: schema, checks, pure-torch implementation (the reference and
the fallback), fake implementation for ``torch.export``, autograd where the op has one.

============================ ===================================== ===================================================
op                           definition                            kernels
============================ ===================================== ===================================================
``vmq::selective_scan``      :mod:`vmq_fx.ops.selective_scan`      ``csrc/selective_scan.cpp``, ``triton/selective_scan.py``
``vmq::causal_conv1d``       :mod:`vmq_fx.ops.causal_conv1d`       ``csrc/causal_conv1d.cpp``
``vmq::hadamard_transform``  :mod:`vmq_fx.ops.hadamard`            ``csrc/hadamard.cpp``
``vmq::rms_norm``,           :mod:`vmq_fx.ops.rms_norm`            ``csrc/rms_norm.cpp``
``vmq::add_rms_norm``
``vmq::int8_linear``         :mod:`vmq_fx.ops.int8_linear`         ``csrc/int8_linear.cpp``, ``triton/int8_linear.py``
``vmq::vq_linear``,          :mod:`vmq_fx.ops.vq_linear`           ``csrc/vq_linear.cpp``, ``triton/vq_linear.py``
``vmq::vq_dequantize``
``vmq::token_stats``,        :mod:`vmq_fx.ops.calibration`         ``csrc/calibration.cpp``
``vmq::histogram_add``,
``vmq::histogram_search``
============================ ===================================== ===================================================

``vmq::selective_scan_backward`` (:mod:`vmq_fx.ops.selective_scan`) is the scan's backward, which its autograd
formula calls: the dispatcher picks the C++ kernel for it as for the others.

The C++ kernels (:mod:`vmq_fx.ops.native`) are built or loaded at the first call of an op on CPU tensors, not at
import; the Triton kernels (:mod:`vmq_fx.ops.triton`) are registered for CUDA when CUDA and Triton are available.
"""
import importlib
import pkgutil

from vmq_fx.ops import calibration, causal_conv1d, hadamard, int8_linear, native, rms_norm, selective_scan, vq_linear

# Every op module defines its op when imported: import all of them, so that a new op is one new module here.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "triton":
        importlib.import_module(f"{__name__}.{_module.name}")
from vmq_fx.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_op
from vmq_fx.ops.hadamard import hadamard_transform, walsh_hadamard
from vmq_fx.ops.int8_linear import int8_linear_reference, pack_int4, unpack_int4
from vmq_fx.ops.selective_scan import selective_scan_fn, selective_scan_op
from vmq_fx.ops.vq_linear import pack_codes, unpack_codes, vq_dequantize, vq_linear_reference

__all__ = ["calibration", "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_op", "hadamard", "hadamard_transform",
           "int8_linear", "int8_linear_reference", "native", "pack_codes", "pack_int4", "rms_norm", "selective_scan",
           "selective_scan_fn", "selective_scan_op", "unpack_codes", "unpack_int4", "vq_dequantize", "vq_linear",
           "vq_linear_reference", "walsh_hadamard"]


def _register_gpu_kernels() -> None:
    import torch

    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            import warnings

            warnings.warn("CUDA is available but Triton is not: the vmq ops run their pure-torch implementations on "
                          "the GPU (slow); install triton for the kernels", stacklevel=2)
            return
        from vmq_fx.ops.triton import register

        register()


_register_gpu_kernels()
