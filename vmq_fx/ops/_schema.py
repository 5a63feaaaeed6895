"""Named views of a vmq op call in a graph, read against the op's registered schema (the one definition of its
arguments: the ``torch.library.custom_op`` signature in the op's module)."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["argument_names", "node_arguments"]


def argument_names(op: torch._ops.OpOverload) -> list[str]:
    """The op's argument names, in schema order."""
    return [a.name for a in op._schema.arguments]


def node_arguments(node: fx.Node, op: torch._ops.OpOverload) -> dict[str, Any]:
    """``{argument name: node or value}`` of a call of ``op``, whether the graph passes them by position or keyword.

    Raises:
        ValueError: the node does not call ``op``, or leaves out an argument without a default.
    """
    if node.op != "call_function" or node.target is not op:
        raise ValueError(f"node {node.name} calls {node.target}, not {op}")
    schema = op._schema.arguments
    values = dict(zip((a.name for a in schema), node.args))
    values.update(node.kwargs)
    for a in schema:
        if a.name not in values:
            if not a.has_default_value():
                raise ValueError(f"node {node.name}: no value for {op}'s argument {a.name!r}")
            values[a.name] = a.default_value
    return values
