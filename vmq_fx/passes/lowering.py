"""Lowering of a ``convert_pt2e`` Q/DQ graph to ``vmq::int8_linear`` (and of vector-quantized linears to
``vmq::vq_linear``).

For each linear that :class:`~vmq_fx.quantizer.VisualMambaQuantizer` quantized, the converted graph holds::

    x -> [div(x, s)] -> quantize_per_channel(axis=1) -> dequantize_per_channel --\\
    W_int (constant) -> dequantize_per_channel(axis=0) --------------------------> linear -> y

(``quantize_per_tensor`` / ``dequantize_per_tensor`` for the per-tensor baseline). The pass

1. folds the smoothing division into the preceding norm's weight when ``x`` is ``mul(normalized, norm_weight)`` with
   no other user (exact: ``(n * g) / s == n * (g / s)`` up to float rounding);
2. otherwise passes ``s`` to the op, which divides by it inside its quantize step (no separate pass over memory);
3. replaces the pattern with one ``vmq::int8_linear`` node holding the integer weight (int8 whatever its bit width),
   its column sums and the per-token activation scales and zero points.

A vector-quantized linear, ``linear(x, vq_dequantize(codes, codebook, row_scale), bias)``, becomes
``vq_linear(x, codes, codebook, row_scale, bias)``. Finally :func:`vmq_fx.passes.simplify.simplify` folds constants and
drops no-op nodes.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

import vmq_fx.ops  # noqa: F401 - registers torch.ops.vmq.*
from vmq_fx.ops.integer_linear import prepare_weight
from vmq_fx.passes.simplify import drop_unused_attributes, simplify
from vmq_fx.quantizer import SMOOTH_ATTR_PREFIX, quantized_linears

__all__ = ["lower"]

_qd = torch.ops.quantized_decomposed
_Q_PER_CHANNEL = _qd.quantize_per_channel.default
_DQ_PER_CHANNEL = _qd.dequantize_per_channel.default
_Q_PER_TENSOR = _qd.quantize_per_tensor.default
_DQ_PER_TENSOR = _qd.dequantize_per_tensor.default
_VQ_DEQUANTIZE = torch.ops.vmq.vq_dequantize.default


def _get(gm: fx.GraphModule, target) -> torch.Tensor:
    return operator.attrgetter(str(target))(gm)


def _attr(gm: fx.GraphModule, node) -> torch.Tensor:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError(f"expected a constant (get_attr) in the quantized pattern, found {node}")
    return _get(gm, node.target)


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value.detach().clone())
    return gm.graph.get_attr(name)


def _is_smooth_div(node, gm: fx.GraphModule) -> bool:
    return (isinstance(node, fx.Node) and node.target is torch.ops.aten.div.Tensor
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
            and str(node.args[1].target).startswith(SMOOTH_ATTR_PREFIX))


def _fold_into_norm(gm: fx.GraphModule, div: fx.Node, index: int) -> bool:
    """x = mul(n, g) with g a 1-D constant and div its only user: g <- g / s, so that x already is x / s.

    Returns whether it folded; the division itself is left for dead-code elimination."""
    x = div.args[0]
    if not (isinstance(x, fx.Node) and x.target is torch.ops.aten.mul.Tensor and len(x.users) == 1):
        return False
    g_node = x.args[1]
    if not (isinstance(g_node, fx.Node) and g_node.op == "get_attr"):
        return False
    g, s = _get(gm, g_node.target), _get(gm, div.args[1].target)
    if g.dim() != 1 or g.shape != s.shape:
        return False
    with gm.graph.inserting_before(x):
        folded = _register(gm, f"vmq_norm_weight_smoothed_{index}", g / s)
    x.args = (x.args[0], folded)
    return True


def lower(quantized: fx.GraphModule, fold_smoothing: bool = True) -> fx.GraphModule:
    """Lower every quantized linear of a ``convert_pt2e`` output to ``vmq::int8_linear`` / ``vmq::vq_linear``
    (in place).

    Args:
        quantized: ``convert_pt2e(prepared)`` of a model prepared with ``VisualMambaQuantizer``.
        fold_smoothing: fold smoothing scales into preceding norm weights where exact (else they are fused into
            the op's quantize step).

    Returns:
        The lowered graph module; each quantized linear is one ``vmq.int8_linear`` or ``vmq.vq_linear`` node.

    Example:
        >>> lowered = vmq_fx.lower(convert_pt2e(prepared))  # doctest: +SKIP
    """
    layers = quantized_linears(quantized)
    gm, graph = quantized, quantized.graph
    lowered = 0
    for node in list(graph.nodes):
        if node.name not in layers:
            continue
        layer = layers[node.name]
        dq_x, dq_w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(dq_w, fx.Node) and dq_w.target is _VQ_DEQUANTIZE:
            if isinstance(dq_x, fx.Node) and dq_x.op == "call_function" and "dequantize" in str(dq_x.target):
                raise ValueError(f"{layer.name}: vector-quantized weights with quantized activations are not lowered")
            with graph.inserting_before(node):
                new = graph.call_function(torch.ops.vmq.vq_linear.default, (dq_x, *dq_w.args[:3], bias, dq_w.args[3]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            lowered += 1
            continue
        if not (isinstance(dq_x, fx.Node) and isinstance(dq_w, fx.Node) and dq_w.target is _DQ_PER_CHANNEL):
            raise ValueError(f"{layer.name}: not a converted Q/DQ linear; run convert_pt2e before lower")
        q_x = dq_x.args[0]
        if dq_x.target is _DQ_PER_CHANNEL and q_x.target is _Q_PER_CHANNEL:
            x, scale_n, zp_n, axis, qmin, qmax = q_x.args[:6]
            if axis != 1:
                raise ValueError(f"{layer.name}: per-channel activation quantization along axis {axis}, expected 1")
            act_scale, act_zp = _attr(gm, scale_n).float(), _attr(gm, zp_n).to(torch.int32)
        elif dq_x.target is _DQ_PER_TENSOR and q_x.target is _Q_PER_TENSOR:
            x, scale_f, zp_i, qmin, qmax = q_x.args[:5]
            length = x.meta["val"].shape[1]
            act_scale = torch.full((length,), float(scale_f))
            act_zp = torch.full((length,), int(zp_i), dtype=torch.int32)
        elif dq_x.target in (torch.ops.torchao.dequantize_affine, torch.ops.torchao.dequantize_affine.default):
            raise ValueError(f"{layer.name}: per-token dynamic activations are not lowered (vmq::int8_linear takes "
                             "static scales); evaluate the convert_pt2e graph for this baseline")
        else:
            raise ValueError(f"{layer.name}: unsupported activation quantization pattern {dq_x.target}")
        w_int = _attr(gm, dq_w.args[0])
        w_scale = _attr(gm, dq_w.args[1]).float()
        w_qmax = int(dq_w.args[5])
        w_bits = w_qmax.bit_length() + 1
        w_stored, w_sum = prepare_weight(w_int)
        index, smooth = lowered, None
        if _is_smooth_div(x, gm):
            div, x = x, x.args[0]
            if not (fold_smoothing and _fold_into_norm(gm, div, index)):
                with graph.inserting_before(node):
                    smooth = _register(gm, f"vmq_q{index}_smooth", _get(gm, div.args[1].target))
        with graph.inserting_before(node):
            prefix = f"vmq_q{index}_"
            args = (
                x,
                smooth,
                _register(gm, prefix + "act_scale", act_scale),
                _register(gm, prefix + "act_zero_point", act_zp),
                _register(gm, prefix + "weight", w_stored),
                _register(gm, prefix + "weight_scale", w_scale),
                _register(gm, prefix + "weight_sum", w_sum),
                bias,
                int(qmin),
                int(qmax),
                w_bits,
            )
            new = graph.call_function(torch.ops.vmq.int8_linear.default, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        lowered += 1
    if lowered != len(layers):
        raise ValueError(f"lowered {lowered} of {len(layers)} quantized linears: the graph was changed after convert")
    graph.eliminate_dead_code()
    drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    return simplify(gm)
