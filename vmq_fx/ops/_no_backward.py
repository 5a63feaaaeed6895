"""The quantized linears (``vmq::int8_linear``, ``vmq::vq_linear``, ``vmq::vq_dequantize``) have no backward: their
weights and scales are quantized constants. With grad mode on, an input that requires grad is refused when the op is
called, on every path: here for the pure-torch and Triton implementations (the autograd layer torch.library puts
above them), in ``csrc/module.cpp`` (the same text) for the C++ kernels, which replace that layer on CPU."""
from __future__ import annotations

__all__ = ["register_no_backward"]


def message(op: str) -> str:
    return (f"vmq.{op}: no backward (the weights and scales are quantized constants); run the quantized model under "
            "torch.no_grad(), or differentiate the prepared (fake-quantized) model")


def register_no_backward(op, name: str) -> None:
    """Make the custom op ``op`` (``vmq::<name>``) refuse inputs that require grad, at the call."""
    def refuse(ctx, inputs, output):  # torch.library calls it only when grad mode is on and an input requires grad
        raise RuntimeError(message(name))

    def backward(ctx, *grads):  # never reached: refuse() raised first
        raise RuntimeError(message(name))

    op.register_autograd(backward, setup_context=refuse)
