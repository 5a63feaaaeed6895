"""Custom ops of vmq_fx (``torch.ops.vmq.*``): schema, fake implementation, CPU implementation, autograd."""
from vmq_fx.ops.selective_scan import selective_scan_fn, selective_scan_op

__all__ = ["selective_scan_fn", "selective_scan_op"]
