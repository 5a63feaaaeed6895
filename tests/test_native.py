"""The C++ CPU kernels are what the dispatcher runs for the vmq ops, and can be switched off."""
import torch

from vmq_fx.ops import native

OPS = ("selective_scan", "int8_linear", "vq_linear", "vq_dequantize")


def _cpu_kernel_source(op: str) -> str | None:
    for line in torch._C._dispatch_dump(f"vmq::{op}").splitlines():
        if line.startswith("CPU:"):
            return line
    return None


def test_cpu_kernels_are_registered_in_the_dispatcher_and_can_be_disabled():
    assert native.native_kernels() is not None, "the fused CPU kernels did not build (see the log)"
    for op in OPS:
        assert "module.cpp" in (_cpu_kernel_source(op) or ""), op
    with native.disabled():
        assert native.native_kernels() is None
        assert all(_cpu_kernel_source(op) is None for op in OPS)
    assert all("module.cpp" in (_cpu_kernel_source(op) or "") for op in OPS)
