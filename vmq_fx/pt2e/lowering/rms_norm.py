"""Fuses the decomposed RMSNorm of a lowered graph into ``vmq::rms_norm``, and the residual add before it into
``vmq::add_rms_norm``.

Under ``torch.export`` Vim's ``RMSNorm`` (VMamba normalizes with ``LayerNorm``, left alone) is six operators::

    mul(mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim=True), eps))), weight)

six passes over the residual stream, which the lowering's other rewrites leave in front of every block's ``in_proj``
(the smoothing scales already folded into ``weight``). One ``vmq::rms_norm`` node computes the same arithmetic in one
pass; only its sum of squares is added in another order, so the normalized values can differ from the six operators'
by an ulp, as folding the smoothing into the weight can (a rare rounding level flips downstream). The chain is fused
only where its intermediate results have no other reader, over the last axis of a float tensor, with ``weight`` a
1-D tensor of that axis' size. Where ``x`` is ``add(a, b)`` of two tensors of its own shape (a pre-norm block's
``residual + hidden``), the add joins the node: ``vmq::add_rms_norm(a, b, weight, eps)`` returns the norm and the sum
(the same float sum), which the add's other readers (the next block's residual add) take instead.
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


def _summands(gm: fx.GraphModule, x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` where ``x`` is ``add(a, b)`` of two tensors of ``x``'s shape and dtype, else ``None``."""
    if x.op != "call_function" or x.target is not _aten.add.Tensor or len(x.args) != 2 or x.kwargs:
        return None
    vals = [_value(gm, a) if isinstance(a, fx.Node) else None for a in (x, *x.args)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    if any(v.shape != vals[0].shape or v.dtype != vals[0].dtype for v in vals[1:]):
        return None
    return x.args


def _defined_before(a: fx.Node, b: fx.Node) -> bool:
    """``a`` comes before ``b`` in their graph's order."""
    for n in b.graph.nodes:
        if n is b:
            return False
        if n is a:
            return True
    return False


def fuse_rms_norms(gm: fx.GraphModule) -> int:
    """Replace each decomposed RMSNorm of ``gm`` with one ``vmq::rms_norm`` node, or with ``vmq::add_rms_norm`` where
    a residual add feeds it (in place; the replaced nodes are left for dead-code elimination).

    Returns:
        How many norms it fused.
    """
    graph, fused, added = gm.graph, 0, 0
    for node in list(graph.nodes):
        found = _norm_inputs(gm, node)
        if found is None:
            continue
        x, weight, eps = found
        summands = _summands(gm, x)
        if summands is not None and weight.op == "get_attr":
            x.prepend(weight)  # the fused node takes x's place, before the weight was read
        elif summands is not None and not _defined_before(weight, x):
            summands = None
        if summands is None:
            with graph.inserting_before(node):
                norm = graph.call_function(torch.ops.vmq.rms_norm.default, found)
            norm.meta = dict(node.meta)
        else:
            with graph.inserting_before(x):  # every reader of the sum comes after it
                both = graph.call_function(torch.ops.vmq.add_rms_norm.default, (*summands, weight, eps))
                norm = graph.call_function(operator.getitem, (both, 0))
                total = graph.call_function(operator.getitem, (both, 1))
            both.meta = {**x.meta, "val": (node.meta.get("val"), x.meta.get("val"))}
            norm.meta, total.meta = dict(node.meta), dict(x.meta)
            x.replace_all_uses_with(total)
            added += 1
        node.replace_all_uses_with(norm)
        fused += 1
    if fused:
        log.debug("fused %d RMSNorm(s) into vmq.rms_norm / vmq.add_rms_norm (%d with their residual add)", fused, added)
    return fused
