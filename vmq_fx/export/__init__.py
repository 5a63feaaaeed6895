"""Exporting models: ``torch.export`` with the conventions of vmq_fx, and ONNX with a translation table for the vmq
ops."""
from vmq_fx.export.onnx import OnnxExportError, OnnxExportResult, export_onnx, onnx_translation_table, ort_session
from vmq_fx.export.program import export_model

__all__ = ["OnnxExportError", "OnnxExportResult", "export_model", "export_onnx", "onnx_translation_table",
           "ort_session"]
