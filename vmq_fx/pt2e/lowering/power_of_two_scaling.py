"""Folds a division by a power of two in front of a ``vmq::int8_linear`` into the op's constants.

Vim's bidirectional blocks average their two scans, ``out_proj((y_fwd + y_bwd) / 2)``: the division is a pass over
the block's widest activation (``[batch, L, d_inner]``), 2 % of a lowered W8A8 vim_tiny forward at batch 8, and the
op's quantize step can absorb it for free. For ``x / c`` with ``c`` a power of two (``div(x, c)`` or
``mul(x, 1 / c)``, reached through layout-only ops such as ``transpose``), the op reads ``x`` and

* with smoothing scales: ``smooth <- smooth * c``. ``(x / c) / smooth`` and ``x / (smooth * c)`` are the same float:
  ``x / c`` and ``smooth * c`` are exact, so both round the same real quotient once;
* static activation parameters without smoothing: ``act_scale <- act_scale * c`` and ``w_scale <- w_scale / c``.
  The levels ``round(x * (1 / (c s)))`` are those of ``round((x / c) * (1 / s))`` (``1 / (c s)`` is ``(1 / s) / c``
  exactly), and the rescale ``acc * (c s) * (w / c)`` gives the floats of ``acc * s * w``: each product is the
  original one times a power of two, which rounds alike.

The results are bit-identical for normal floats (``x / c`` below 2^-126 would lose bits as a subnormal: such inputs
quantize to the zero point either way). Per-token dynamic parameters without smoothing are left alone: their scale
comes from each row's range, whose float32-epsilon floor would not scale with ``c``. So is a division whose result
has other readers, or a constant that another node shares.
"""
from __future__ import annotations

import logging
import math
import operator
from collections import Counter

import torch
from torch import fx

from vmq_fx.ops.int8_linear import Int8LinearArgs

__all__ = ["fold_power_of_two_scaling"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten
# Ops that move elements without changing them: a division by a scalar commutes with them.
_LAYOUT_OPS = {_aten.transpose.int, _aten.permute.default, _aten.view.default, _aten.reshape.default,
               _aten._unsafe_view.default}


def _power_of_two_divisor(node) -> float | None:
    """``c`` where ``node`` is ``div(x, c)`` or ``mul(x, 1 / c)`` with ``c`` a positive power of two (a number)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and len(node.args) == 2):
        return None
    x, k = node.args
    if not isinstance(x, fx.Node) or isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
        return None
    if node.target is _aten.div.Tensor:
        c = float(k)
    elif node.target is _aten.mul.Tensor:
        c = 1.0 / float(k)
    else:
        return None
    return c if math.isfinite(c) and math.frexp(c)[0] == 0.5 and c != 1.0 else None


def _own_constant(gm: fx.GraphModule, node, get_attrs: Counter) -> torch.Tensor | None:
    """The tensor a get_attr ``node`` reads, where that node has one reader and no other get_attr reads the tensor
    (``get_attrs``: the graph's get_attr nodes per target)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return None
    if get_attrs[node.target] != 1:
        return None
    return operator.attrgetter(str(node.target))(gm)


def _set_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    owner, _, name = str(node.target).rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    delattr(module, name)
    module.register_buffer(name, value)


def fold_power_of_two_scaling(gm: fx.GraphModule) -> int:
    """Fold each division by a power of two in front of a ``vmq::int8_linear`` into its constants (in place; the
    module docstring gives the rules). Returns the number folded; the divisions are left for dead-code elimination.

    Example:
        >>> import torch
        >>> from vmq_fx.ops.int8_linear import prepare_weight
        >>> g = torch.Generator().manual_seed(0)
        >>> w8, w_sum = prepare_weight(torch.randint(-127, 128, (3, 4), generator=g))
        >>> class HalfThenLinear(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         consts = dict(scale=torch.full((2,), 0.02), zp=torch.full((2,), 128, dtype=torch.int32), w=w8,
        ...                       w_scale=torch.full((3,), 0.01), w_sum=w_sum)
        ...         for name, value in consts.items():
        ...             self.register_buffer(name, value)
        ...     def forward(self, x):
        ...         return torch.ops.vmq.int8_linear(x / 2, None, self.scale, self.zp, self.w, self.w_scale,
        ...                                          self.w_sum, None, 0, 255, 8)
        >>> x = torch.randn(1, 2, 4, generator=g)
        >>> gm = torch.export.export(HalfThenLinear(), (x,)).module()
        >>> before = gm(x)
        >>> fold_power_of_two_scaling(gm)
        1
        >>> _ = gm.graph.eliminate_dead_code(); _ = gm.recompile()
        >>> torch.equal(gm(x), before), [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
        (True, ['int8_linear.default'])
    """
    folded = 0
    get_attrs = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")  # folding keeps every target
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not Int8LinearArgs.op:
            continue
        args = Int8LinearArgs.from_node(node)
        reader, source = node, args.x
        while isinstance(source, fx.Node) and source.target in _LAYOUT_OPS and len(source.users) == 1:
            reader, source = source, source.args[0]
        c = _power_of_two_divisor(source)
        if c is None or len(source.users) != 1:
            continue
        if args.smooth is not None:
            changes = {args.smooth: lambda t: t * c}
        elif args.act_scale is not None:
            changes = {args.act_scale: lambda t: t * c, args.w_scale: lambda t: t / c}
        else:
            continue
        tensors = {n: _own_constant(gm, n, get_attrs) for n in changes}
        if any(t is None for t in tensors.values()):
            continue
        new = {n: change(tensors[n]) for n, change in changes.items()}
        if not all(bool(torch.isfinite(t).all() and (t.abs() >= torch.finfo(t.dtype).tiny).all()) for t in new.values()):
            continue
        for n, value in new.items():
            _set_constant(gm, n, value)
        reader.replace_input_with(source, source.args[0])
        folded += 1
    if folded:
        log.debug("folded %d power-of-two divisions into vmq::int8_linear constants", folded)
    return folded
