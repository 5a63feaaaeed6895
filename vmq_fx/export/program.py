"""``torch.export`` of Visual Mamba models with a dynamic batch dimension."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["export_model"]


def export_model(model: nn.Module, example: Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """Export ``model`` on an example image batch; the batch dimension stays dynamic.

    The selective scan of every mixer becomes one ``vmq.selective_scan`` node. Trace with a batch of 2 or more:
    a batch of 1 would be specialized by ``torch.export``.

    Args:
        model: a Vim / VMamba model (or any module taking one image tensor), in eval mode.
        example: an example input, [batch, channels, height, width].
        dynamic_batch: mark dimension 0 as dynamic.

    Example:
        >>> import torch
        >>> from vmq_fx.models import create_model
        >>> from vmq_fx.export import export_model
        >>> ep = export_model(create_model("vim_fm_tiny").eval(), torch.randn(2, 1, 28, 28))
        >>> ep.module()(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError("export_model: trace a dynamic batch with an example batch of at least 2 (got 1)")
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(model, (example,), dynamic_shapes=dynamic)
