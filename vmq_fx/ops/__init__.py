"""Custom ops of vmq_fx (``torch.ops.vmq.*``): schema, fake implementation, CPU implementation, autograd."""
from vmq_fx.ops.int8_linear import int8_linear, int8_linear_reference, pack_int4, unpack_int4
from vmq_fx.ops.selective_scan import selective_scan_fn, selective_scan_op

__all__ = ["int8_linear", "int8_linear_reference", "pack_int4", "selective_scan_fn", "selective_scan_op",
           "unpack_int4"]
