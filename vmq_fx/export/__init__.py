"""Exporting models: ``torch.export`` with the conventions of vmq_fx (ONNX export joins in a later step)."""
from vmq_fx.export.program import export_model

__all__ = ["export_model"]
