"""Graph clean-up run at the end of lowering: what ``torch.export`` leaves for its own checks and what depends on
the weights only is not recomputed on every call.

* constant folding (torchao's PT2E ``constant_fold``): ``-exp(A_log.float())``, ``D.float()``, ``bias.float()`` ...
  become constants; vmq ops and dequantize ops are never folded (that would decode compressed weights into floats);
* ``aten.to`` to the dtype the value already has is dropped, and so is ``aten._assert_tensor_metadata`` (torch.export
  inserts one per ``.to()`` to re-check the dtype the trace saw; the lowered graph's dtypes are fixed).

Each of these costs ~1-2 microseconds of Python per node per call: at batch 1 on small models they add up to a
fifth of the forward time.
"""
from __future__ import annotations

import torch
from torch import fx
from torchao.quantization.pt2e.constant_fold import constant_fold

__all__ = ["simplify"]

_NEVER_FOLD_NAMESPACES = {"vmq", "quantized_decomposed", "torchao"}


def _foldable(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", None) not in _NEVER_FOLD_NAMESPACES


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten._assert_tensor_metadata.default:
        return True
    if node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs:
        val = getattr(node.args[0], "meta", {}).get("val")
        return isinstance(val, torch.Tensor) and val.dtype == node.args[1]
    return False


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no get_attr reads, at any depth (the float weights that convert_pt2e folded into
    integer constants, the inputs of folded constants), so that they leave the model and its state dict."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [
        n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop no-op nodes and fold constants of a lowered graph (in place); returns ``gm``."""
    for node in list(gm.graph.nodes):
        if _is_noop(node):
            if node.target is torch.ops.aten.to.dtype:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    before = set(gm._buffers)
    with torch.no_grad():
        constant_fold(gm, constraint_fn=_foldable)
    # Folded constants own their memory (safetensors saves each once) and carry no autograd history: a slice of a
    # parameter folds into a view that would keep one, and a graph module holding it cannot be deep-copied.
    for name in set(gm._buffers) - before:
        gm.register_buffer(name, gm._buffers[name].detach().clone())
    drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
