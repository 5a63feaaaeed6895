"""Fuses the sum of Vim's two scan directions into the later scan: ``vmq::selective_scan(..., add=other)``.

Vim's bidirectional mixer adds the output of its forward scan to that of its backward (``reverse``) scan before
``out_proj``::

    add(getitem(selective_scan(...), 0), getitem(selective_scan(..., reverse=True), 0))

one more pass over three [batch, d_inner, L] tensors per block, 3 % of the lowered Vim-T at batch 8 on a CPU. The later
of the two scans takes the earlier one's output as its ``add`` input and writes the sum in its output pass instead:
the same float sum, bit for bit. Fused where each of the two outputs is read by the add alone, neither scan has an
``add`` yet, and the earlier output is computed before the later scan runs.
"""
from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import vmq_fx.ops  # noqa: F401 - registers torch.ops.vmq.*

__all__ = ["fuse_scan_sums"]

log = logging.getLogger(__name__)

_SCAN = torch.ops.vmq.selective_scan.default
_ADD_INDEX = 10  # u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, add


def _scan_of(value) -> fx.Node | None:
    """The scan whose output ``value`` is (``getitem(scan, 0)`` read by one node), where the scan has no ``add``."""
    if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem
            and value.args[1] == 0 and len(value.users) == 1):
        return None
    scan = value.args[0]
    if not (isinstance(scan, fx.Node) and scan.op == "call_function" and scan.target is _SCAN):
        return None
    if "add" in scan.kwargs or (len(scan.args) > _ADD_INDEX and scan.args[_ADD_INDEX] is not None):
        return None
    return scan


def fuse_scan_sums(gm: fx.GraphModule) -> int:
    """Hand the later of two scans whose outputs are added the earlier one's output as ``add``, and let the add's
    readers read the later scan's output (in place; the add is erased).

    Returns:
        How many sums it fused.
    """
    graph, fused = gm.graph, 0
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2 \
                or node.kwargs:
            continue
        scans = [_scan_of(a) for a in node.args]
        if None in scans or scans[0] is scans[1]:
            continue
        vals = [v.meta.get("val") for v in (node, *node.args)]
        if not all(isinstance(v, torch.Tensor) for v in vals) or \
                any(v.shape != vals[0].shape or v.dtype != vals[0].dtype for v in vals[1:]):
            continue
        (earlier_out, _), (later_out, later) = sorted(zip(node.args, scans), key=lambda pair: position[pair[1]])
        if position[earlier_out] > position[later] or set(later.kwargs) - {"reverse"} or len(later.args) < 9:
            continue
        reverse = later.args[9] if len(later.args) > 9 else later.kwargs.get("reverse", False)
        later.args, later.kwargs = (*later.args[:9], reverse, earlier_out), {}
        node.replace_all_uses_with(later_out)
        graph.erase_node(node)
        fused += 1
    if fused:
        log.debug("fused %d sum(s) of two scans' outputs into vmq.selective_scan(add=...)", fused)
    return fused
