"""ONNX export of FP, Q/DQ and lowered Visual Mamba models (``torch.onnx.export(dynamo=True)`` + a translation table).

How the vmq ops become standard ONNX (opset 18):

* ``vmq::selective_scan`` -> one ``Scan`` (reading and writing in reverse for ``reverse=True``) whose body is a single
  recurrence step (``h = exp(dt * A) * h + dt * u * B``, ``y = sum_n h * C``); the discretization inputs are sliced per
  token by the ``Scan``, so the file size and the export time do not depend on the sequence length. The state is
  ``[batch, groups, channels/group, d_state]``; ``A`` rides along as a loop-invariant state. Dynamic batch. Measured
  alternatives in standard ops were slower in onnxruntime (decays and inputs computed for all steps outside the loop
  with 1, 4, 8 or 16 steps per iteration: 1.2-1.35x slower at Vim-T shapes; ORT's ``com.microsoft.LinearAttention`` with
  per-key decay computes the same recurrence, 1.1-3x slower): the ``Scan`` is the portable path and the default.
  ``export_onnx(..., ops="vmq")`` writes one ``vmq.SelectiveScan`` node instead, which onnxruntime runs with vmq_fx's
  fused kernel (:mod:`vmq_fx.export.ort_ops`, ~10x faster than the ``Scan``; the file then needs that library, which
  links no torch).
* ``vmq::causal_conv1d`` -> ``Pad`` along the sequence, then ``K`` shifted ``Slice`` windows times their taps, summed
  (``+ bias``, ``* Sigmoid`` for the SiLU), in the channels-last layout of the op. ``export_onnx(..., ops="vmq")``
  writes one ``vmq.CausalConv1d`` node instead (the torch op's kernel).
* ``vmq::hadamard_transform`` -> ``Reshape`` of the last axis to ``[m, a, c]`` (``a c = 2^k``), ``MatMul`` by the
  constants ``H_c`` and ``H_a`` (``H_{2^k} = kron(H_a, H_c)``: two small matrices instead of one ``2^k`` square per
  node), ``MatMul`` by ``odd^T``, ``Reshape`` back. ``export_onnx(..., ops="vmq")`` writes one
  ``vmq.HadamardTransform`` node instead (the torch op's fast transform).
* ``vmq::rms_norm`` -> ``Pow`` / ``ReduceMean`` / ``Add`` / ``Sqrt`` / ``Reciprocal`` / ``Mul`` / ``Mul``, the operators
  torch's own translation writes for the decomposed norm it replaces; ``vmq::add_rms_norm`` -> an ``Add``, then the
  same. ``export_onnx(..., ops="vmq")`` writes one ``vmq.RmsNorm`` / ``vmq.AddRmsNorm`` node instead (the torch ops'
  one-pass kernels).
* ``vmq::int8_linear`` -> ``[Div(smooth)]`` -> ``Mul(1 / act_scale)`` -> ``QuantizeLinear(axis=1)`` with unit scales and
  the per-token zero points as constants (plus a ``Clip`` to ``[qmin, qmax]`` below 8 bits) -> ``MatMulInteger``
  (uint8 x int8 -> int32 for weights of up to 7 bits; 8-bit weights as uint8 x uint8, moved up by 128 (folded at load)
  with ``b_zero_point`` 128, since onnxruntime's uint8 x int8 saturates on AVX2 without VNNI once 2 x 255 x |w| passes
  32767) -> subtract ``zero_point[t] * w_sum[n]`` (the column sums the
  lowering stored) -> ``Cast`` -> ``* act_scale[t] * w_scale[n]`` (+ bias).
  onnxruntime's ``MatMulInteger`` takes only a per-tensor activation zero point, hence the explicit correction.
  4-bit weights stay packed two per byte in the file and are unpacked in the graph (``BitwiseAnd`` / ``BitShift``).
  Per-token dynamic (no ``act_scale``): each row's parameters in the graph (``ReduceMin`` / ``ReduceMax``, then the
  float32 arithmetic of torchao's ``choose_qparams_affine``), the levels by ``Round`` / ``Clip`` / ``Cast``, and the
  same ``MatMulInteger``, correction and rescale with the per-row zero points and scales.
  ``export_onnx(..., ops="vmq")`` writes one ``vmq.Int8Linear`` node instead: the torch op's quantize and rescale as
  one pass each around onnxruntime's own ``MatMulInteger``, whose operand types the kernel picks for the CPU it runs
  on (uint8 x int8 with VNNI for every weight width): 1.2-1.3x the FP32 file's speed for vim_tiny W8A8, where the
  standard form is 0.93x (``bench/cpu_latency.py``).
* ``vmq::vq_linear`` / ``vmq::vq_dequantize`` -> the bit-packed codes, the float16 codebook (one initializer for a
  shared one) and the 8-bit row-scale codes stay in the file and are decoded in the graph (bit extraction, ``Gather``
  of codewords, ``2^(code / 16 - 12)`` row scales) before a ``MatMul``.
* ``quantized_decomposed`` Q/DQ ops of a ``convert_pt2e`` graph -> ``QuantizeLinear`` / ``DequantizeLinear``
  (torch's own translations).
* ``aten.split`` / ``split_with_sizes`` / ``chunk`` with static sizes (the in_proj and x_proj outputs) -> one ``Split``
  whose outputs are used directly; torch's translations go through ``SplitToSequence`` + ``SequenceAt``, 1.5-4 % slower
  for vim_tiny in onnxruntime. Symbolic sizes keep torch's translations.

Rounding: ``QuantizeLinear`` divides by the scale, while torch's ``quantize_per_channel`` and the vmq ops multiply by
its reciprocal. The lowered ``int8_linear`` translation multiplies too, so its integer levels are those of the torch
op; the Q/DQ reference graph (torch's own translation) divides and can pick the neighbouring level for values within
an ulp of a rounding boundary, so its logits agree to a looser bound (see the tests and ``bench/results/onnx.md``).
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vmq_fx.export.metadata import model_metadata

__all__ = ["OnnxExportError", "OnnxExportResult", "export_onnx", "onnx_translation_table", "ort_session"]

log = logging.getLogger(__name__)

_OPSET = 18
CUSTOM_DOMAIN = "vmq"  # the domain of vmq_fx's onnxruntime ops (export_onnx(ops="vmq"))


class OnnxExportError(RuntimeError):
    """The model holds an operator that has no ONNX translation (or the exporter failed on it)."""


@dataclass(frozen=True)
class OnnxExportResult:
    path: str
    seconds: float
    bytes: int
    op_counts: dict[str, int]


def _ops():
    try:
        import onnx_ir as ir
        from onnxscript import opset18 as op
        from torch.onnx._internal.exporter._torchlib.ops.hop import call_op
    except ImportError as e:  # optional dependency
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vmq-fx[onnx]'") from e
    return ir, op, call_op


def _const(op, values, dtype):
    ir, _, _ = _ops()
    return op.Constant(value=ir.tensor(np.array(values, dtype=dtype)))


def _scan_body(ir, prefix: str):
    """One recurrence step. Inputs: h [b,g,c,n], A [g,c,n], dt [b,g,c,1], du [b,g,c,1], B_t [b,g,1,n],
    C_t [b,g,1,n]; outputs: h', A, y [b,g,c]. Every value gets a name unique in the model (ONNX is SSA across
    subgraphs): ``prefix`` is the scan's."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    names = ("h", "A", "dt", "du", "B_t", "C_t")
    ins = [ir.Value(name=prefix + n, type=f32, shape=ir.Shape([None] * (3 if n == "A" else 4))) for n in names]
    h, a, dt, du, b_t, c_t = ins
    count = itertools.count()

    def node(op_type, *inputs, **attrs):
        attributes = ir.convenience.convert_attributes(attrs) if attrs else ()
        out = ir.Node("", op_type, inputs, attributes=attributes, num_outputs=1)
        out.outputs[0].name = f"{prefix}{op_type.lower()}_{next(count)}"
        return out

    rate = node("Mul", dt, a)
    decay = node("Exp", rate.outputs[0])
    kept = node("Mul", decay.outputs[0], h)
    inject = node("Mul", du, b_t)
    h_new = node("Add", kept.outputs[0], inject.outputs[0])
    read = node("Mul", h_new.outputs[0], c_t)
    axes = node("Constant", value=ir.tensor(np.array([-1], dtype=np.int64)))
    y = node("ReduceSum", read.outputs[0], axes.outputs[0], keepdims=0)
    a_out = node("Identity", a)
    nodes = [rate, decay, kept, inject, h_new, read, axes, y, a_out]
    for v in (h_new.outputs[0], a_out.outputs[0], y.outputs[0]):
        v.type = f32
    return ir.Graph(ins, [h_new.outputs[0], a_out.outputs[0], y.outputs[0]], nodes=nodes, name="selective_scan_step")


def _selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                    add=None):
    ir, op, call_op = _ops()
    channels, d_state = A.shape[0], A.shape[1]
    if not isinstance(channels, int) or not isinstance(d_state, int):
        raise OnnxExportError("vmq.selective_scan: A must have static shape [channels, d_state] for ONNX export")
    groups = B.shape[1] if len(B.shape) == 4 else 1
    per_group = channels // groups
    if delta_bias is not None:
        delta = op.Add(delta, op.Unsqueeze(delta_bias, _const(op, [-1], np.int64)))
    if delta_softplus:
        delta = op.Softplus(delta)
    du = op.Mul(delta, u)

    def per_token(x):  # [b, channels, L] -> [L, b, g, c, 1]
        x = op.Reshape(x, _const(op, [0, groups, per_group, -1], np.int64))
        return op.Unsqueeze(op.Transpose(x, perm=[3, 0, 1, 2]), _const(op, [-1], np.int64))

    def per_token_bc(x):  # [b, n, L] or [b, g, n, L] -> [L, b, g, 1, n]
        if len(x.shape) == 3:
            x = op.Unsqueeze(x, _const(op, [1], np.int64))
        return op.Unsqueeze(op.Transpose(x, perm=[3, 0, 1, 2]), _const(op, [3], np.int64))

    batch = op.Shape(u, start=0, end=1)
    h0 = op.Expand(_const(op, 0.0, np.float32),
                   op.Concat(batch, _const(op, [groups, per_group, d_state], np.int64), axis=0))
    a_g = op.Reshape(A, _const(op, [groups, per_group, d_state], np.int64))
    # The prefix is unique in the model and the same whenever the model is exported (the exporter's name of u).
    # reverse: the Scan reads its per-token inputs from the last token and writes ys back at their positions.
    directions = {"scan_input_directions": [1, 1, 1, 1], "scan_output_directions": [1]} if reverse else {}
    h, _, ys = call_op("Scan", h0, a_g, per_token(delta), per_token(du), per_token_bc(B), per_token_bc(C),
                       _num_outputs=3, body=_scan_body(ir, f"selective_scan_{u.name}_"), num_scan_inputs=4,
                       **directions)
    y = op.Reshape(op.Transpose(ys, perm=[1, 2, 3, 0]), _const(op, [0, channels, -1], np.int64))
    if D is not None:
        y = op.Add(y, op.Mul(u, op.Unsqueeze(D, _const(op, [-1], np.int64))))
    if z is not None:
        y = op.Mul(y, op.Mul(z, op.Sigmoid(z)))
    if add is not None:
        y = op.Add(y, add)
    return y, op.Reshape(h, _const(op, [0, channels, d_state], np.int64))


def _transposed_from(value):
    """The ``[batch, L, channels]`` value that a ``[batch, channels, L]`` value is a ``Transpose(perm=[0, 2, 1])`` of,
    or ``None``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get("perm")
    return node.inputs[0] if perm is not None and list(perm.as_ints()) == [0, 2, 1] else None


def _split_window(value):
    """``(source, offset)`` where ``value`` is output ``i`` of a ``Split`` of ``source`` along its last axis into
    constant sizes (channels ``[offset, offset + size_i)`` of ``source``), else ``None``: the vmq ops read such a slice
    in place, where onnxruntime's ``Split`` copies it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    source, sizes = node.inputs[0], node.inputs[1]
    axis = node.attributes.get("axis")
    axis = axis.as_int() if axis is not None else 0
    if source is None or sizes is None or axis not in (-1, len(source.shape) - 1):
        return None
    constant = sizes.producer()
    if constant is None or constant.op_type != "Constant" or "value" not in constant.attributes:
        return None
    sizes = constant.attributes["value"].as_tensor().numpy().tolist()
    return source, int(sum(sizes[:list(node.outputs).index(value)]))


def _drop_dead_nodes(graph) -> None:
    """Remove the top-level nodes none of whose outputs is used (the ``Split`` s whose slices the vmq ops now read in
    place, and the constants that fed them)."""
    outputs = set(graph.outputs)
    dead = True
    while dead:
        dead = [n for n in graph if all(not v.uses() and v not in outputs for v in n.outputs)]
        for node in reversed(dead):
            graph.remove(node, safe=True)


def _selective_scan_custom(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                           add=None):
    """One ``vmq.SelectiveScan`` node (the fused kernel, :mod:`vmq_fx.export.ort_ops`).

    The model hands the scan ``[batch, channels, L]`` transposes of its sequence-major activations; the node takes
    those activations themselves where it can see the ``Transpose`` (attribute ``sequence_major``), since the kernel
    reads either layout in place: the copies would cost ~8 % of a Vim forward in onnxruntime. It writes ``y``
    sequence-major (``[batch, L, channels]``, as the kernel stores it) and a ``Transpose`` gives the op's
    ``[batch, channels, L]`` (onnxruntime's transpose optimizer cancels it against the model's own where it can).
    A sequence-major gate ``z`` that is a slice of a last-axis ``Split`` (Vim's in_proj output) is read in place from
    the split tensor (attribute ``z_offset``); once the convolution reads the other slice so, the ``Split`` and its
    copies are gone (2-3 % of vim_tiny in onnxruntime). ``add`` (Vim's other direction, which the lowering hands the
    torch op) is an ``Add`` after the node, of the sequence-major rows where ``add`` is a transpose (an ``Add`` of the
    transposes left 24 ``Transpose`` nodes in vim_tiny's optimized session, 0.92x as fast). Read by the node's output
    pass instead (the torch kernel's way: a ninth input, the output allowed to take its buffer), the W8A8 vim_tiny
    file ran 0.95x / 0.94x as fast at batch 1 / 8, because onnxruntime's default execution order (a depth-first walk
    back from the outputs, a node's highest-index producer first) then made both directions' scan inputs before
    either scan ran; with the earlier scan's node moved to just before the later one, so that each direction ran
    together, it ran 0.99x / 1.00x as fast as with the ``Add`` (its scans 130 -> 140 ms at batch 8, the ``Add`` s 12
    ms gone; Intel Xeon, one thread, one process), and was not kept."""
    _, op, call_op = _ops()
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    sequence_major = []
    for index in (0, 1, 3, 4, 6):  # u, delta, B, C, z: 3-D [batch, channels, L]
        source = _transposed_from(inputs[index]) if inputs[index] is not None and len(inputs[index].shape) == 3 else None
        if source is not None:
            inputs[index] = source
            sequence_major.append(index)
    attrs = {"sequence_major": sequence_major} if sequence_major else {}
    window = _split_window(inputs[6]) if 6 in sequence_major else None
    if window is not None:  # the gate: a slice of in_proj's output, read in place
        inputs[6], attrs["z_offset"] = window
    y_rows, last = call_op("SelectiveScan", *inputs, _num_outputs=2, _domain=CUSTOM_DOMAIN,
                           softplus=int(delta_softplus), reverse=int(reverse), **attrs)
    rows = _transposed_from(add)
    if rows is not None:  # summed sequence-major: onnxruntime then cancels the Transpose against out_proj's
        y_rows = op.Add(rows, y_rows)  # add first, as the add it replaces (0.93-0.96x as fast the other way)
    y = op.Transpose(y_rows, perm=[0, 2, 1])
    return (op.Add(y, add) if add is not None and rows is None else y), last


def _causal_conv1d(x, weight, bias=None, silu=False, reverse=False):
    """[batch, L, C] -> Pad along L, then K shifted windows times their taps (channels-last, no transposes)."""
    _, op, _ = _ops()
    kernel, length = weight.shape[1], x.shape[1]
    if not isinstance(kernel, int) or not isinstance(length, int):
        raise OnnxExportError("vmq.causal_conv1d: the kernel width and the sequence length must be static for ONNX "
                              "export")
    pads = [0, 0, 0, 0, kernel - 1, 0] if reverse else [0, kernel - 1, 0, 0, 0, 0]  # begins, then ends
    padded = op.Pad(x, _const(op, pads, np.int64))
    taps = op.Transpose(weight, perm=[1, 0])  # [K, C]
    y = None
    for j in range(kernel):
        tap = op.Gather(taps, _const(op, kernel - 1 - j if reverse else j, np.int64), axis=0)
        window = op.Slice(padded, _const(op, [j], np.int64), _const(op, [j + length], np.int64),
                          _const(op, [1], np.int64))
        term = op.Mul(window, tap)
        y = term if y is None else op.Add(y, term)
    if bias is not None:
        y = op.Add(y, bias)
    return op.Mul(y, op.Sigmoid(y)) if silu else y


def _causal_conv1d_custom(x, weight, bias=None, silu=False, reverse=False):
    """One ``vmq.CausalConv1d`` node (the torch op's kernel, :mod:`vmq_fx.export.ort_ops`); the taps go in as
    ``[K, channels]`` (a ``Transpose`` of the weight, folded at load). Where ``x`` is a slice of a last-axis ``Split``
    (Vim's in_proj output), the node reads it in place from the split tensor (attribute ``offset``)."""
    _, op, call_op = _ops()
    window = _split_window(x)
    attrs = {}
    if window is not None:  # a slice of in_proj's output, read in place
        x, attrs["offset"] = window
    (y,) = call_op("CausalConv1d", x, op.Transpose(weight, perm=[1, 0]), bias, _domain=CUSTOM_DOMAIN,
                   silu=int(silu), reverse=int(reverse), **attrs)
    return y


def _hadamard_transform(x, odd=None):
    """``x @ kron(odd, H_b)`` over the last axis in ``MatMul`` s: ``H_b = kron(H_a, H_c)`` (``a c = b``, both powers of
    two), so the last axis is viewed as ``[m, a, c]`` and multiplied by ``H_c``, then ``H_a`` from the left, then
    ``odd^T`` from the left: ``a + c + m`` multiply-adds per value, and two constants of at most ``sqrt(2b)``
    squared."""
    from vmq_fx.ops.hadamard import walsh_hadamard

    _, op, _ = _ops()
    d, rank = x.shape[-1], len(x.shape)
    m = 1 if odd is None else odd.shape[0]
    if not isinstance(d, int) or not isinstance(m, int):
        raise OnnxExportError("vmq.hadamard_transform: the transformed axis must be static for ONNX export")
    b = d // m
    a = 1 << (b.bit_length() - 1) // 2
    c = b // a
    keep = [0] * (rank - 1)  # Reshape copies these axes
    y = op.Reshape(x, _const(op, keep + [m, a, c], np.int64))
    if c > 1:
        y = op.MatMul(y, _const(op, walsh_hadamard(c).numpy(), np.float32))
    if a > 1:
        y = op.MatMul(_const(op, walsh_hadamard(a).numpy(), np.float32), y)
    if odd is not None:
        y = op.MatMul(op.Transpose(odd, perm=[1, 0]), op.Reshape(y, _const(op, keep + [m, b], np.int64)))
    return op.Reshape(y, _const(op, keep + [d], np.int64))


def _hadamard_transform_custom(x, odd=None):
    """One ``vmq.HadamardTransform`` node (the torch op's fast transform, :mod:`vmq_fx.export.ort_ops`)."""
    _, _, call_op = _ops()
    (y,) = call_op("HadamardTransform", x, odd, _domain=CUSTOM_DOMAIN)
    return y


def _rms_norm(x, weight, eps):
    """``x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * weight`` over the last axis."""
    _, op, _ = _ops()
    mean = op.ReduceMean(op.Pow(x, _const(op, 2.0, np.float32)), _const(op, [-1], np.int64), keepdims=1)
    inv = op.Reciprocal(op.Sqrt(op.Add(mean, _const(op, eps, np.float32))))
    return op.Mul(op.Mul(x, inv), weight)


def _rms_norm_custom(x, weight, eps):
    """One ``vmq.RmsNorm`` node (the torch op's one-pass kernel, :mod:`vmq_fx.export.ort_ops`)."""
    _, _, call_op = _ops()
    (y,) = call_op("RmsNorm", x, weight, _domain=CUSTOM_DOMAIN, epsilon=float(eps))
    return y


def _add_rms_norm(x, residual, weight, eps):
    """``Add``, then :func:`_rms_norm` of the sum; the sum is the second output."""
    _, op, _ = _ops()
    total = op.Add(x, residual)
    return _rms_norm(total, weight, eps), total


def _add_rms_norm_custom(x, residual, weight, eps):
    """One ``vmq.AddRmsNorm`` node (the torch op's one-pass kernel, :mod:`vmq_fx.export.ort_ops`)."""
    _, _, call_op = _ops()
    y, total = call_op("AddRmsNorm", x, residual, weight, _num_outputs=2, _domain=CUSTOM_DOMAIN, epsilon=float(eps))
    return y, total


def _unpack_int4(op, w, k: int):
    """uint8 [N, ceil(K/2)] (low nibble first) -> int8 [N, K] in [-8, 7]."""
    lo = op.BitwiseAnd(w, _const(op, 15, np.uint8))
    hi = op.BitShift(w, _const(op, 4, np.uint8), direction="RIGHT")
    both = op.Concat(op.Unsqueeze(lo, _const(op, [-1], np.int64)),
                     op.Unsqueeze(hi, _const(op, [-1], np.int64)), axis=-1)
    both = op.Reshape(both, _const(op, [0, -1], np.int64))
    both = op.Slice(both, _const(op, [0], np.int64), _const(op, [k], np.int64), _const(op, [1], np.int64))
    signed = op.Sub(op.Cast(op.BitwiseXor(both, _const(op, 8, np.uint8)), to=6), _const(op, 8, np.int32))
    return op.Cast(signed, to=3)  # int32 -> int8


def _int8_weight(w, k: int):
    """The stored weight as int8 ``[N, K]``: unpacked when it holds 4-bit values two per byte."""
    ir, op, _ = _ops()
    return _unpack_int4(op, w, k) if w.dtype == ir.DataType.UINT8 else w


def _int8_linear(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax, w_bits):
    _, op, _ = _ops()
    k = x.shape[-1]
    if smooth is not None:
        x = op.Div(x, smooth)
    last = _const(op, [-1], np.int64)
    if act_scale is None:
        # Per-token dynamic: each row's parameters in float32, in the order torchao's choose_qparams_affine computes
        # them (the range widened to hold 0; scale at least float32 epsilon), then the levels as quantize_affine
        # rounds them: round(x * (1 / scale)) + zp, clamped.
        zero, lo_q, hi_q = (_const(op, v, np.float32) for v in (0.0, act_qmin, act_qmax))
        lo = op.Min(op.ReduceMin(x, last, keepdims=1), zero)
        hi = op.Max(op.ReduceMax(x, last, keepdims=1), zero)
        scale = op.Max(op.Div(op.Sub(hi, lo), _const(op, act_qmax - act_qmin, np.float32)),
                       _const(op, np.finfo(np.float32).eps, np.float32))  # [..., L, 1]
        zp = op.Clip(op.Sub(lo_q, op.Round(op.Div(lo, scale))), lo_q, hi_q)
        levels = op.Clip(op.Add(op.Round(op.Mul(x, op.Reciprocal(scale))), zp), lo_q, hi_q)
        xq, zp_rows, scale_rows = op.Cast(levels, to=2), op.Cast(zp, to=6), scale  # uint8 levels; [..., L, 1]
    else:
        # x * (1 / scale) then QuantizeLinear with unit scales: the levels of the torch op, which multiplies by the
        # reciprocal (QuantizeLinear itself divides, and would round a few boundary values the other way).
        inv = op.Unsqueeze(op.Reciprocal(act_scale), last)
        unit = op.Expand(_const(op, 1.0, np.float32), op.Shape(act_scale))
        xq = op.QuantizeLinear(op.Mul(x, inv), unit, op.Cast(act_zero_point, to=2), axis=1)  # uint8 levels
        if act_qmin != 0 or act_qmax != 255:
            xq = op.Clip(xq, _const(op, act_qmin, np.uint8), _const(op, act_qmax, np.uint8))
        zp_rows, scale_rows = op.Unsqueeze(act_zero_point, last), op.Unsqueeze(act_scale, last)  # [L, 1]
    # onnxruntime multiplies uint8 x int8 on AVX2 CPUs without VNNI in 16-bit pair sums that saturate (vpmaddubsw):
    # exact only while 2 x 255 x max|w| <= 32767, i.e. for weights of up to 7 bits (|w| <= 64). Those keep that form
    # (the fastest: 3.9x onnxruntime's fp32 MatMul at Vim-T shapes on AVX-512 VNNI); 8-bit weights are moved up by 128
    # into uint8 (folded once, at load: the file keeps int8) with b_zero_point 128, exact on every CPU (1.5x fp32; int8
    # x int8 would be 0.3x). bench/ort_matmul_integer.py measures the three.
    w8 = _int8_weight(w, k)
    w_t = op.Transpose(w8, perm=[1, 0])
    if w_bits <= 7:
        acc = op.MatMulInteger(xq, w_t)
    else:
        w_u8 = op.Cast(op.Add(op.Cast(w_t, to=6), _const(op, 128, np.int32)), to=2)
        acc = op.MatMulInteger(xq, w_u8, _const(op, 0, np.uint8), _const(op, 128, np.uint8))
    out = op.Cast(op.Sub(acc, op.Mul(zp_rows, w_sum)), to=1)  # the zero points' share: zp x column sums
    out = op.Mul(op.Mul(out, scale_rows), w_scale)
    return out if bias is None else op.Add(out, bias)


def _int8_linear_custom(x, smooth, act_scale, act_zero_point, w, w_scale, w_sum, bias, act_qmin, act_qmax, w_bits):
    """One ``vmq.Int8Linear`` node (:mod:`vmq_fx.export.ort_ops`): the torch op's quantize and rescale around
    onnxruntime's own ``MatMulInteger``, whose operand types the kernel picks for the CPU it runs on. The weight goes in
    transposed and unpacked (``[K, N]`` int8; onnxruntime folds that at load)."""
    _, op, call_op = _ops()
    w8 = _int8_weight(w, x.shape[-1])
    (out,) = call_op("Int8Linear", x, smooth, act_scale, act_zero_point, op.Transpose(w8, perm=[1, 0]), w_scale,
                     w_sum, bias, _domain=CUSTOM_DOMAIN, qmin=int(act_qmin), qmax=int(act_qmax), w_bits=int(w_bits))
    return out


def _vq_weight(op, codes, codebook, row_scale, in_features: int):
    k, d = codebook.shape
    bits = max(1, int(np.ceil(np.log2(k))))
    rows = codes.shape[0]
    per_row = -(-in_features // d)
    if bits == 8:
        idx = op.Cast(codes, to=7)
    else:
        shifts = _const(op, list(range(8)), np.uint8)
        stream = op.BitwiseAnd(op.BitShift(op.Unsqueeze(codes, _const(op, [-1], np.int64)), shifts,
                                           direction="RIGHT"), _const(op, 1, np.uint8))
        stream = op.Reshape(stream, _const(op, [rows, -1], np.int64))
        stream = op.Slice(stream, _const(op, [0], np.int64), _const(op, [per_row * bits], np.int64),
                          _const(op, [1], np.int64))
        stream = op.Cast(op.Reshape(stream, _const(op, [rows, per_row, bits], np.int64)), to=7)
        idx = op.ReduceSum(op.Mul(stream, _const(op, [1 << b for b in range(bits)], np.int64)),
                           _const(op, [-1], np.int64), keepdims=0)
    w = op.Reshape(op.Gather(op.Cast(codebook, to=1), idx, axis=0), _const(op, [rows, -1], np.int64))
    if per_row * d != in_features:
        w = op.Slice(w, _const(op, [0], np.int64), _const(op, [in_features], np.int64),
                     _const(op, [1], np.int64))
    # the 8-bit logarithmic row scale, 2^(code / 16 - 12) (vmq_fx.ops.vq_linear.decode_row_scale)
    scale = op.Pow(_const(op, 2.0, np.float32), op.Add(op.Mul(op.Cast(row_scale, to=1), _const(op, 1 / 16, np.float32)),
                                                        _const(op, -12.0, np.float32)))
    return op.Mul(w, op.Unsqueeze(scale, _const(op, [-1], np.int64)))


def _vq_dequantize(codes, codebook, row_scale, in_features):
    _, op, _ = _ops()
    return _vq_weight(op, codes, codebook, row_scale, in_features)


def _vq_linear(x, codes, codebook, row_scale, bias, in_features):
    _, op, _ = _ops()
    out = op.MatMul(x, op.Transpose(_vq_weight(op, codes, codebook, row_scale, in_features), perm=[1, 0]))
    return out if bias is None else op.Add(out, bias)


def _pieces(total: int, size: int) -> list[int]:
    """``total`` cut into pieces of ``size``, the last one shorter (torch.split's and torch.chunk's sizes)."""
    return [min(size, total - start) for start in range(0, total, size)]


def _static_split(x, sizes, dim: int):
    """One ``Split`` into static ``sizes``, its outputs returned as a tuple (the exporter indexes them directly):
    torch's own translations write ``SplitToSequence`` + ``SequenceAt``, 1.5-4 % of a vim_tiny forward in
    onnxruntime (AVX-512 AMX Xeon)."""
    _, op, call_op = _ops()
    if len(sizes) == 1:
        return (op.Identity(x),)
    return tuple(call_op("Split", x, _const(op, sizes, np.int64), axis=dim, _num_outputs=len(sizes)))


def _torchlib(name: str):
    from onnxscript.function_libs.torch_lib.ops import core

    return getattr(core, name)


# The parameters are named as in the aten schemas (tests/test_op_definitions.py), ``self`` included.
def _split_with_sizes(self, split_sizes, dim: int = 0):
    if all(isinstance(s, int) for s in split_sizes):
        return _static_split(self, list(split_sizes), dim)
    return _torchlib("aten_split_with_sizes")(self, split_sizes, dim)


def _split(self, split_size, dim: int = 0):
    total = self.shape[dim]
    if isinstance(total, int) and isinstance(split_size, int):
        return _static_split(self, _pieces(total, split_size), dim)
    return _torchlib("aten_split")(self, split_size, dim)


def _chunk(self, chunks: int, dim: int = 0):
    total = self.shape[dim]
    if isinstance(total, int):
        return _static_split(self, _pieces(total, -(-total // chunks)), dim)  # chunks of ceil(total / chunks)
    return _torchlib("aten_chunk")(self, chunks, dim)


OPS = ("onnx", "vmq")  # export_onnx(ops=...): standard ONNX everywhere, or vmq_fx's onnxruntime ops where it has one


def onnx_translation_table(ops: str = "onnx") -> dict:
    """``{torch.ops.vmq.<op>.default: translation}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Args:
        ops: ``"onnx"``: standard ONNX operators only (the selective scan as a ``Scan``); ``"vmq"``: the selective
            scan, the causal convolution, the Hadamard transform, the RMSNorm (with its residual add) and the
            integer linear as one node each (``vmq.SelectiveScan``, ``vmq.CausalConv1d``, ``vmq.HadamardTransform``,
            ``vmq.RmsNorm`` / ``vmq.AddRmsNorm``, ``vmq.Int8Linear``: vmq_fx's onnxruntime library).
    """
    import vmq_fx.ops  # noqa: F401 - registers torch.ops.vmq.*

    if ops not in OPS:
        raise ValueError(f"ops must be one of {', '.join(OPS)}, got {ops!r}")
    vmq = torch.ops.vmq
    table = {
        vmq.selective_scan.default: _selective_scan,
        vmq.causal_conv1d.default: _causal_conv1d,
        vmq.hadamard_transform.default: _hadamard_transform,
        vmq.rms_norm.default: _rms_norm,
        vmq.add_rms_norm.default: _add_rms_norm,
        vmq.int8_linear.default: _int8_linear,
        vmq.vq_linear.default: _vq_linear,
        vmq.vq_dequantize.default: _vq_dequantize,
        torch.ops.aten.split_with_sizes.default: _split_with_sizes,
        torch.ops.aten.split.Tensor: _split,
        torch.ops.aten.chunk.default: _chunk,
    }
    if ops == "vmq":
        table.update({vmq.selective_scan.default: _selective_scan_custom,
                      vmq.causal_conv1d.default: _causal_conv1d_custom,
                      vmq.hadamard_transform.default: _hadamard_transform_custom,
                      vmq.rms_norm.default: _rms_norm_custom,
                      vmq.add_rms_norm.default: _add_rms_norm_custom,
                      vmq.int8_linear.default: _int8_linear_custom})
    return table


_STANDARD_NAMESPACES = {"aten", "prims", "quantized_decomposed", "higher_order"}


def _untranslatable_ops(ep: torch.export.ExportedProgram, table: dict) -> list[str]:
    bad = set()
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace not in _STANDARD_NAMESPACES and node.target not in table:
            bad.add(str(node.target))
    return sorted(bad)


def _strip_metadata(model) -> None:
    """Drop the exporter's per-node debugging metadata (source stack traces, module stacks): it is most of the file
    for small models."""
    ir, _, _ = _ops()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, dynamic_batch: bool = True,
                ops: str = "onnx", config=None) -> OnnxExportResult:
    """Export an FP, ``convert_pt2e`` (Q/DQ) or lowered Visual Mamba model to an ONNX file.

    The file carries the model's preprocessing and class names and the custom-op library it needs, if any, in its
    metadata (:mod:`vmq_fx.export.metadata`), so that it deploys with nothing but onnxruntime
    (``examples/deploy_onnxruntime.py``).

    Args:
        model: an eager model, ``torch.export``-ed graph module, ``convert_pt2e`` output or :func:`vmq_fx.lower`
            output.
        example: an example image batch (batch of 2 or more when ``dynamic_batch``).
        path: the ``.onnx`` file to write.
        dynamic_batch: keep the batch dimension dynamic.
        ops: ``"onnx"``: standard ONNX operators only (portable: any ONNX runtime; every selective scan is a
            ``Scan``); ``"vmq"``: the selective scans, causal convolutions, Hadamard transforms and integer linears
            as ops of vmq_fx's onnxruntime library (:mod:`vmq_fx.export.ort_ops`, no torch; :func:`ort_session`
            registers it; the scan about as fast as torch).
        config: the model's ``VimConfig`` / ``VMambaConfig`` (default: ``model.config``, or the configuration a
            lowered or loaded quantized model records); ``None`` and none recorded: the file's metadata has no
            preprocessing.

    Returns:
        An :class:`OnnxExportResult` with the path, the export time, the file size and the operator counts.

    Raises:
        OnnxExportError: the model holds an operator without ONNX translation (named in the message).

    Example:
        >>> import torch, tempfile, os, vmq_fx
        >>> model = vmq_fx.models.create_model("vim_fm_tiny", depth=1).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "vim.onnx")
        >>> vmq_fx.export_onnx(model, torch.randn(2, 1, 28, 28), path).op_counts["Scan"]
        2
    """
    _ops()
    t0 = time.perf_counter()
    from vmq_fx.pt2e.lowering.int4_storage import int4_weight_names, pack_int4_weights

    if isinstance(model, torch.fx.GraphModule) and int4_weight_names(model):
        model = pack_int4_weights(copy.deepcopy(model))  # 4-bit weights go to the file two per byte
    table = onnx_translation_table(ops)
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError("export_onnx: trace a dynamic batch with an example batch of at least 2 (got 1)")
    ep = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    bad = _untranslatable_ops(ep, table)
    if bad:
        raise OnnxExportError(f"no ONNX translation for operator(s) {', '.join(bad)}; vmq_fx translates "
                              f"{', '.join(sorted(str(k) for k in table))} and the standard aten / quantized_decomposed "
                              "ops")
    try:
        # No exporter optimization: its constant folding would decode packed 4-bit weights and VQ codes into
        # int8 / float initializers and undo the small file. onnxruntime folds them in memory at load time.
        program = torch.onnx.export(ep, (example,), dynamo=True, custom_translation_table=table,
                                    opset_version=_OPSET, optimize=False, verbose=False)
    except Exception as e:  # the exporter's innermost error names the op it could not translate
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise OnnxExportError(f"ONNX export failed: {type(root).__name__}: {str(root).splitlines()[0][:500]}") from e
    _strip_metadata(program.model)
    _drop_dead_nodes(program.model.graph)
    used_domains = sorted({n.domain for n in program.model.graph} & {CUSTOM_DOMAIN})
    for domain in used_domains:
        program.model.opset_imports[domain] = 1
    if config is None:
        config = getattr(model, "config", None) or getattr(model, "meta", {}).get("vmq_config")
    if config is None:
        log.warning("export_onnx: no model configuration: the file's metadata will not hold its preprocessing")
    program.model.metadata_props.update(model_metadata(config, used_domains))
    path = os.fspath(path)
    program.save(path)
    seconds = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for node in program.model.graph:  # top-level nodes, as saved
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return OnnxExportResult(path, seconds, os.path.getsize(path), counts)


def ort_session(path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None):
    """An onnxruntime CPU session for a file written by :func:`export_onnx`.

    A ``convert_pt2e`` Q/DQ graph (activations through ``QuantizeLinear`` -> ``DequantizeLinear`` -> ``MatMul``) is
    run with ``ORT_ENABLE_BASIC`` graph optimizations: at the default level onnxruntime fuses the per-token pattern
    into ``MatMulIntegerToFloat``, which rejects per-row zero points at run time (an onnxruntime limitation).
    Lowered graphs (``MatMulInteger``) and FP graphs run at the default level.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: onnxruntime's default); a ``vmq.SelectiveScan`` runs on them too.
        profile_prefix: switch on onnxruntime's profiler; ``session.end_profiling()`` then writes its per-node
            timings (Chrome trace JSON) to a file named from this prefix.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    if any(n.domain == CUSTOM_DOMAIN for n in graph.node):
        from vmq_fx.export.ort_ops import custom_ops_library

        opts.register_custom_ops_library(custom_ops_library())
    produced = {out for n in graph.node for out in n.output}
    activation_qdq = any(n.op_type == "DequantizeLinear" and n.input[0] in produced for n in graph.node)
    if activation_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
