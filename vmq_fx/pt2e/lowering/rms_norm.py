"""Fuses the decomposed RMSNorm of a lowered graph into ``vmq::rms_norm``.

Under ``torch.export`` Vim's and VMamba's ``RMSNorm`` is six operators::

    mul(mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim=True), eps))), weight)

six passes over the residual stream, which the lowering's other rewrites leave in front of every block's ``in_proj``
(the smoothing scales already folded into ``weight``). One ``vmq::rms_norm`` node computes the same arithmetic in one
pass; only its sum of squares is added in another order, so the normalized values can differ from the six operators'
by an ulp, as folding the smoothing into the weight can (a rare rounding level flips downstream). The chain is fused
only where its intermediate results have no other reader, over the last axis of a float tensor, with ``weight`` a
1-D tensor of that axis' size.
"""
from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import vmq_fx.ops  # noqa: F401 - registers torch.ops.vmq.*

__all__ = ["fuse_rms_norms"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten


def _only(node, target) -> bool:
    """``node`` is a call of ``target`` whose result one node reads."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target and len(node.users) == 1


def _value(gm: fx.GraphModule, node: fx.Node):
    """What ``node`` holds as far as the graph knows it (its traced value, or the tensor a get_attr reads)."""
    if node.op == "get_attr":
        return operator.attrgetter(str(node.target))(gm)
    return node.meta.get("val")


def _norm_inputs(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``(x, weight, eps)`` where ``node`` is the last ``mul`` of the chain, else ``None``."""
    if node.op != "call_function" or node.target is not _aten.mul.Tensor or len(node.args) != 2:
        return None
    normalized, weight = node.args
    if not (_only(normalized, _aten.mul.Tensor) and isinstance(weight, fx.Node)):
        return None
    x, rsqrt = normalized.args
    if not (_only(rsqrt, _aten.rsqrt.default) and _only(rsqrt.args[0], _aten.add.Tensor)):
        return None
    mean, eps = rsqrt.args[0].args
    if not (_only(mean, _aten.mean.dim) and isinstance(eps, float) and _only(mean.args[0], _aten.pow.Tensor_Scalar)):
        return None
    square = mean.args[0]
    x_val, w_val = _value(gm, x), _value(gm, weight)
    if square.args != (x, 2) or not isinstance(x_val, torch.Tensor) or not isinstance(w_val, torch.Tensor):
        return None
    dims, keepdim = list(mean.args[1]), mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims not in ([-1], [x_val.dim() - 1]) or not keepdim or mean.kwargs.get("dtype") is not None:
        return None
    if x_val.dtype not in (torch.float32, torch.float64) or tuple(w_val.shape) != (x_val.shape[-1],):
        return None
    return x, weight, eps


def fuse_rms_norms(gm: fx.GraphModule) -> int:
    """Replace each decomposed RMSNorm of ``gm`` with one ``vmq::rms_norm`` node (in place; the replaced nodes are left
    for dead-code elimination).

    Returns:
        How many it fused.
    """
    fused = 0
    for node in list(gm.graph.nodes):
        found = _norm_inputs(gm, node)
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            norm = gm.graph.call_function(torch.ops.vmq.rms_norm.default, found)
        norm.meta = dict(node.meta)
        node.replace_all_uses_with(norm)
        fused += 1
    if fused:
        log.debug("fused %d RMSNorm(s) into vmq.rms_norm", fused)
    return fused
