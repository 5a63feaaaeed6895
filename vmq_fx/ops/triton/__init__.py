"""Triton kernels behind the vmq ops (installed as ``vmq_fx.ops.triton``), each with its pure-torch reference in
:mod:`vmq_fx.ops`. :func:`register` makes them the CUDA implementations of ``vmq::int8_linear``, ``vmq::vq_linear``
and ``vmq::selective_scan`` (forward); the CPU implementations stay. ``vmq_fx.ops`` calls it on import when CUDA and
Triton are available.
"""
from __future__ import annotations

__all__ = ["register"]

_REGISTERED = False


def register() -> None:
    """Register the Triton kernels as the ``cuda`` implementations of the vmq ops (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vmq_fx.ops.triton.int8_linear import int8_linear_triton
    from vmq_fx.ops.triton.selective_scan import selective_scan_triton
    from vmq_fx.ops.triton.vq_linear import vq_linear_triton
    from vmq_fx.ops.int8_linear import int8_linear
    from vmq_fx.ops.selective_scan import selective_scan_op
    from vmq_fx.ops.vq_linear import vq_linear

    int8_linear.register_kernel("cuda")(int8_linear_triton)
    vq_linear.register_kernel("cuda")(vq_linear_triton)
    selective_scan_op.register_kernel("cuda")(selective_scan_triton)
    _REGISTERED = True
