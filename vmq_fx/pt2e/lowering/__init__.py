"""Lowering of a converted (Q/DQ) graph to the vmq ops: :func:`lower` runs the registered rewrites, then
simplifies the graph."""
from vmq_fx.pt2e.lowering.rewrites import lower

__all__ = ["lower"]
