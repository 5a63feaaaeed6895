"""Lowering of a ``convert_pt2e`` graph: each linear :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer` quantized
(``node.meta["vmq_linear"]``) becomes one vmq op.

The rewrites form a table keyed by the pattern they replace (:data:`REWRITES`); the first whose pattern matches a
linear's arguments rewrites it:

``per-token static``::

    x -> [div(x, s), tagged meta["vmq_smoothing"]] -> quantize_per_channel(axis=1) -> dequantize_per_channel --\\
    W_int (constant) -> dequantize_per_channel(axis=0) ---------------------------------------------------------> linear

``outlier channels``: the per-token static pattern twice on the same ``x`` (the second with 8-bit levels), joined by
``where(mask, dq8, dq)`` (tagged ``meta["vmq_outliers"]``). It becomes two ``vmq::int8_linear`` s added: one on all of
``x`` with the outlier channels' weight columns set to zero (their levels, clamped to the other channels' range, then
add nothing), one on ``index_select(x, -1, outliers)`` with those columns and the 8-bit steps.
``per-tensor static``: the same with ``quantize_per_tensor`` / ``dequantize_per_tensor`` on the activation.
``per-token dynamic``: torchao's ``choose_qparams_affine`` -> ``quantize_affine`` -> ``dequantize_affine`` with a
block of one row (what :class:`~vmq_fx.pt2e.observers.fake_quantize.PerTokenDynamicFakeQuantize` converts to).
Each becomes one ``vmq::int8_linear`` holding the integer weight (int8 at run time whatever its bit width), its column
sums and scales, and the per-token activation scales and zero points (none for the dynamic pattern: the op computes
each row's at run time); the smoothing division is folded into the
preceding norm's weight when ``x`` is ``mul(normalized, norm_weight)`` with no other user (exact:
``(n * g) / s == n * (g / s)`` up to float rounding), else fused into the op's quantize step. A Hadamard rotation's
``vmq::hadamard_transform`` (tagged ``meta["vmq_rotation"]``) stays in front of the op; the division before it is
folded into the norm the same way, else kept.

``vector-quantized weight``: ``linear(x, vq_dequantize(codes, codebook, row_scale), bias)`` becomes
``vq_linear(x, codes, codebook, row_scale, bias)``.

Linears quantized by other quantizers keep their own Q/DQ patterns. A division of an op's input by a power of two
(Vim's average of its two scans) is then folded into the op's constants, exactly
(:mod:`vmq_fx.pt2e.lowering.power_of_two_scaling`), :func:`vmq_fx.pt2e.lowering.simplify.simplify` folds constants
and drops no-op nodes, and each decomposed RMSNorm becomes one ``vmq::rms_norm``, with the residual add before it
``vmq::add_rms_norm`` (:mod:`vmq_fx.pt2e.lowering.rms_norm`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

import vmq_fx.ops  # noqa: F401 - registers torch.ops.vmq.*
from vmq_fx.pt2e.observers.fake_quantize import OUTLIER_META, SMOOTHING_META
from vmq_fx.ops._schema import argument_names
from vmq_fx.ops.int8_linear import Int8LinearArgs, prepare_weight
from vmq_fx.ops.vq_linear import VQLinearArgs
from vmq_fx.pt2e.lowering.power_of_two_scaling import fold_power_of_two_scaling
from vmq_fx.pt2e.lowering.rms_norm import fuse_rms_norms
from vmq_fx.pt2e.lowering.scan_sum import fuse_scan_sums
from vmq_fx.pt2e.lowering.simplify import drop_unused_attributes, simplify
from vmq_fx.pt2e.quantizer import LAYER_META, QuantizedLinear

__all__ = ["REWRITES", "Lowering", "lower", "rewrite"]

_qd = torch.ops.quantized_decomposed
_ao = torch.ops.torchao

@dataclass
class Lowering:
    """What a rewrite needs besides the linear: the graph module, the number of the linear among the lowered ones
    (names its constants) and the options of :func:`lower`."""

    gm: fx.GraphModule
    index: int = 0
    fold_smoothing: bool = True


# pattern name -> rewrite(lowering, linear node, layer) -> the replacement node, or None when the pattern does not
# match the linear's arguments
REWRITES: dict[str, Callable[[Lowering, fx.Node, QuantizedLinear], fx.Node | None]] = {}


def rewrite(pattern: str):
    """Register a rewrite of a quantized linear under the name of the pattern it replaces."""
    def register(fn):
        REWRITES[pattern] = fn
        return fn
    return register


def _get(gm: fx.GraphModule, target) -> torch.Tensor:
    return operator.attrgetter(str(target))(gm)


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    return _get(gm, node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value.detach().clone())
    return gm.graph.get_attr(name)


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _fold_into_norm(gm: fx.GraphModule, div: fx.Node, index: int) -> bool:
    """x = mul(n, g) with g a 1-D constant and div its only user: g <- g / s, so that x already is x / s.

    Returns whether it folded; the division itself is left for dead-code elimination."""
    x = div.args[0]
    if not (_is(x, torch.ops.aten.mul.Tensor) and len(x.users) == 1):
        return False
    g, s = _constant(gm, x.args[1]), _constant(gm, div.args[1])
    if g is None or s is None or g.dim() != 1 or g.shape != s.shape:
        return False
    with gm.graph.inserting_before(x):
        folded = _register(gm, f"vmq_norm_weight_smoothed_{index}", g / s)
    x.args = (x.args[0], folded)
    return True


def _integer_weight(gm: fx.GraphModule, dq_w):
    """(int8 weight, per-row scale) of ``dequantize_per_channel(W_int, scale, zp, 0, ...)`` with a constant W_int."""
    if not _is(dq_w, _qd.dequantize_per_channel.default):
        return None
    w_int, w_scale = _constant(gm, dq_w.args[0]), _constant(gm, dq_w.args[1])
    if w_int is None or w_scale is None or dq_w.args[3] != 0:
        return None
    return w_int, w_scale.float()


def _is_smoothing(x) -> bool:
    return _is(x, torch.ops.aten.div.Tensor) and bool(x.meta.get(SMOOTHING_META))


def _unsmoothed(ctx: Lowering, x) -> tuple:
    """(the input before a tagged smoothing division, the smoothing scales the op must still divide by or ``None``):
    the division is folded into the preceding norm where exact, else left to the op. Before a Hadamard transform
    (``x = hadamard_transform(div(x, s))``) it is folded likewise, else left in the graph."""
    if _is(x, torch.ops.vmq.hadamard_transform.default) and _is_smoothing(x.args[0]):
        div = x.args[0]
        if ctx.fold_smoothing and _fold_into_norm(ctx.gm, div, ctx.index):
            x.replace_input_with(div, div.args[0])
        return x, None
    if not _is_smoothing(x):
        return x, None
    div, x = x, x.args[0]
    if ctx.fold_smoothing and _fold_into_norm(ctx.gm, div, ctx.index):
        return x, None
    return x, _get(ctx.gm, div.args[1].target)


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else None


def _int8_linear(ctx: Lowering, node: fx.Node, layer: QuantizedLinear, x, act_scale, act_zp, qmin, qmax, w_int,
                 w_scale, bias, smooth: torch.Tensor | None = None, name: str = "") -> fx.Node:
    """One ``vmq::int8_linear`` (constants named ``vmq_q{index}{name}_*``); ``x`` may still carry its smoothing
    division, unless ``smooth`` is given (then ``x`` is the input before it)."""
    gm, graph, index = ctx.gm, ctx.gm.graph, ctx.index
    if smooth is None:
        x, smooth = _unsmoothed(ctx, x)
    w8, w_sum = prepare_weight(w_int)
    prefix = f"vmq_q{index}{name}_"
    with graph.inserting_before(node):
        smooth = None if smooth is None else _register(gm, prefix + "smooth", smooth)
        static = act_scale is not None
        args = Int8LinearArgs(
            x=x, smooth=smooth, act_scale=_register(gm, prefix + "act_scale", act_scale) if static else None,
            act_zero_point=_register(gm, prefix + "act_zero_point", act_zp) if static else None,
            w=_register(gm, prefix + "weight", w8),
            w_scale=_register(gm, prefix + "weight_scale", w_scale), w_sum=_register(gm, prefix + "weight_sum", w_sum),
            bias=bias, act_qmin=int(qmin), act_qmax=int(qmax), w_bits=layer.recipe.w_bits)
        return graph.call_function(torch.ops.vmq.int8_linear.default, args.as_args())


@rewrite("per-token static")
def _per_token_static(ctx: Lowering, node: fx.Node, layer: QuantizedLinear) -> fx.Node | None:
    gm = ctx.gm
    dq_x, weight = node.args[0], _integer_weight(gm, node.args[1])
    if weight is None or not _is(dq_x, _qd.dequantize_per_channel.default):
        return None
    q_x = dq_x.args[0]
    if not _is(q_x, _qd.quantize_per_channel.default) or q_x.args[3] != 1:
        return None
    x, scale, zp, _, qmin, qmax = q_x.args[:6]
    return _int8_linear(ctx, node, layer, x, _constant(gm, scale).float(), _constant(gm, zp).to(torch.int32), qmin,
                        qmax, *weight, _bias(node))


@rewrite("outlier channels")
def _outlier_channels(ctx: Lowering, node: fx.Node, layer: QuantizedLinear) -> fx.Node | None:
    gm, graph = ctx.gm, ctx.gm.graph
    where, weight = node.args[0], _integer_weight(gm, node.args[1])
    if weight is None or not (_is(where, torch.ops.aten.where.self) and where.meta.get(OUTLIER_META)):
        return None
    mask, parts = _constant(gm, where.args[0]), []
    if mask is None:
        return None
    for dq in where.args[1:]:  # (8-bit outliers, the rest)
        q = dq.args[0] if _is(dq, _qd.dequantize_per_channel.default) else None
        if not _is(q, _qd.quantize_per_channel.default) or q.args[3] != 1:
            return None
        parts.append((_constant(gm, q.args[1]).float(), _constant(gm, q.args[2]).to(torch.int32), *q.args[4:6]))
    x = where.args[2].args[0].args[0]
    if where.args[1].args[0].args[0] is not x:
        return None
    x, smooth = _unsmoothed(ctx, x)
    w_int, w_scale = weight
    channels = mask.nonzero().flatten()
    rest = w_int.clone()
    rest[:, channels] = 0
    main = _int8_linear(ctx, node, layer, x, *parts[1], rest, w_scale, _bias(node), smooth=smooth)
    with graph.inserting_before(node):
        picked = graph.call_function(torch.ops.aten.index_select.default,
                                     (x, -1, _register(gm, f"vmq_q{ctx.index}_outlier_channels", channels)))
    outliers = _int8_linear(ctx, node, layer, picked, *parts[0], w_int[:, channels].contiguous(), w_scale, None,
                            smooth=None if smooth is None else smooth[channels], name="_outliers")
    outliers.meta[OUTLIER_META] = True  # the 8-bit part: its weights are the same linear's (bits_per_weight)
    w_scale_at = argument_names(torch.ops.vmq.int8_linear.default).index("w_scale")
    outliers.update_arg(w_scale_at, main.args[w_scale_at])  # the same row scales: stored once
    with graph.inserting_before(node):
        return graph.call_function(torch.ops.aten.add.Tensor, (main, outliers))


@rewrite("per-tensor static")
def _per_tensor_static(ctx: Lowering, node: fx.Node, layer: QuantizedLinear) -> fx.Node | None:
    dq_x, weight = node.args[0], _integer_weight(ctx.gm, node.args[1])
    if weight is None or not _is(dq_x, _qd.dequantize_per_tensor.default):
        return None
    q_x = dq_x.args[0]
    if not _is(q_x, _qd.quantize_per_tensor.default):
        return None
    x, scale, zp, qmin, qmax = q_x.args[:5]
    length, device = x.meta["val"].shape[1], x.meta["val"].device
    return _int8_linear(ctx, node, layer, x, torch.full((length,), float(scale), device=device),
                        torch.full((length,), int(zp), dtype=torch.int32, device=device), qmin, qmax, *weight,
                        _bias(node))


@rewrite("per-token dynamic")
def _per_token_dynamic(ctx: Lowering, node: fx.Node, layer: QuantizedLinear) -> fx.Node | None:
    dq_x, weight = node.args[0], _integer_weight(ctx.gm, node.args[1])
    if weight is None or not any(_is(dq_x, t) for t in (_ao.dequantize_affine, _ao.dequantize_affine.default)):
        return None
    q_x = dq_x.args[0]
    if not any(_is(q_x, t) for t in (_ao.quantize_affine, _ao.quantize_affine.default)):
        return None
    x, block, scale = q_x.args[:3]
    qparams = scale.args[0] if _is(scale, operator.getitem) else None
    choose = (_ao.choose_qparams_affine, _ao.choose_qparams_affine.default)
    if qparams is None or qparams.args[0] is not x or not any(_is(qparams, t) for t in choose):
        return None
    # Only the parameters the op computes: asymmetric min-max over each whole row, float32 epsilon.
    mapping, eps = qparams.args[1], qparams.args[6]
    if list(block) != [1] * (len(block) - 1) + [x.meta["val"].shape[-1]] or str(mapping) != "ASYMMETRIC" or \
            eps != torch.finfo(torch.float32).eps:
        return None
    qmin, qmax = q_x.args[5], q_x.args[6]
    return _int8_linear(ctx, node, layer, x, None, None, qmin, qmax, *weight, _bias(node))


@rewrite("vector-quantized weight")
def _vector_quantized(ctx: Lowering, node: fx.Node, layer: QuantizedLinear) -> fx.Node | None:
    dq_x, dq_w = node.args[0], node.args[1]
    if not _is(dq_w, torch.ops.vmq.vq_dequantize.default):
        return None
    if isinstance(dq_x, fx.Node) and dq_x.op == "call_function" and "dequantize" in str(dq_x.target):
        raise ValueError(f"{layer.name}: vector-quantized weights with quantized activations are not lowered")
    bias = _bias(node)
    codes, codebook, row_scale, in_features = dq_w.args[:4]
    args = VQLinearArgs(x=dq_x, codes=codes, codebook=codebook, row_scale=row_scale, bias=bias,
                        in_features=in_features)
    with ctx.gm.graph.inserting_before(node):
        return ctx.gm.graph.call_function(torch.ops.vmq.vq_linear.default, args.as_args())


def _describe(node: fx.Node) -> str:
    shown = [str(a.target) if isinstance(a, fx.Node) else repr(a) for a in node.args[:2]]
    return f"no rewrite ({', '.join(REWRITES)}) matches its inputs ({', '.join(shown)}); run convert_pt2e first"


def lower(quantized: fx.GraphModule, fold_smoothing: bool = True, fold_power_of_two: bool = True,
          fuse_norms: bool = True, fuse_scan_sum: bool = True) -> fx.GraphModule:
    """Lower every linear a :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer` quantized in a ``convert_pt2e`` output
    to ``vmq::int8_linear`` / ``vmq::vq_linear`` (in place).

    Args:
        quantized: ``convert_pt2e(prepared)`` of a model prepared with ``VisualMambaQuantizer``.
        fold_smoothing: fold smoothing scales into preceding norm weights where exact (else they are fused into
            the op's quantize step).
        fold_power_of_two: fold a division of an op's input by a power of two into its constants (bit-identical
            results, one pass over the activation fewer; off for comparisons).
        fuse_norms: each RMSNorm as one ``vmq::rms_norm`` node instead of six operators, with the residual add
            before it one ``vmq::add_rms_norm`` (one pass over the activations instead of seven; the sum of squares
            in its own order; off for comparisons).
        fuse_scan_sum: where two scans' outputs are added (Vim's two directions), the later scan adds the earlier
            one's output in its output pass (``vmq::selective_scan(..., add=...)``; the same bits; off for
            comparisons).

    Returns:
        The lowered graph module; each of those linears is one ``vmq.int8_linear`` or ``vmq.vq_linear`` node. It is
        for inference: its parameters are frozen (``requires_grad=False``), as the quantized linears have no
        backward.

    Example:
        >>> lowered = vmq_fx.lower(convert_pt2e(prepared))  # doctest: +SKIP
    """
    gm, graph = quantized, quantized.graph
    ctx = Lowering(gm, fold_smoothing=fold_smoothing)
    for node in list(graph.nodes):
        layer = node.meta.get(LAYER_META)
        if layer is None or node.target is not torch.ops.aten.linear.default:
            continue
        new = next((r for r in (fn(ctx, node, layer) for fn in REWRITES.values()) if r is not None), None)
        if new is None:
            raise ValueError(f"{layer.name}: {_describe(node)}")
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        ctx.index += 1
    if not ctx.index:
        raise ValueError("lower: no linear quantized by VisualMambaQuantizer in this graph (no node carries "
                         f"meta[{LAYER_META!r}])")
    graph.eliminate_dead_code()
    if fold_power_of_two and fold_power_of_two_scaling(gm):
        graph.eliminate_dead_code()
    drop_unused_attributes(gm)
    gm.requires_grad_(False)
    graph.lint()
    gm.recompile()
    gm = simplify(gm)  # first: it drops the no-op `to` between a residual add and its norm
    fused_norms = fuse_norms and fuse_rms_norms(gm) > 0
    fused_sums = fuse_scan_sum and fuse_scan_sums(gm) > 0
    if fused_norms or fused_sums:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return gm
