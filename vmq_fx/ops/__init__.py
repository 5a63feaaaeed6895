"""Custom ops of vmq_fx (``torch.ops.vmq.*``): schema, fake implementation, CPU implementation, autograd."""
from vmq_fx.ops.causal_conv1d import causal_conv1d, causal_conv1d_op
from vmq_fx.ops.integer_linear import int8_linear, int8_linear_reference, pack_int4, unpack_int4
from vmq_fx.ops.selective_scan import selective_scan_fn, selective_scan_op
from vmq_fx.ops.codebook_linear import pack_codes, unpack_codes, vq_dequantize, vq_linear, vq_linear_reference

from vmq_fx.ops import native

# After the op definitions above: the C++ kernels replace their pure-torch CPU implementations where they build.
native.enable()

__all__ = ["causal_conv1d", "causal_conv1d_op", "int8_linear", "int8_linear_reference", "pack_codes", "pack_int4",
           "selective_scan_fn", "selective_scan_op", "unpack_codes", "unpack_int4", "vq_dequantize", "vq_linear",
           "vq_linear_reference"]


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
        from vmq_fx.kernels import register

        register()


_register_gpu_kernels()
