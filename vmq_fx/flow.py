"""The whole post-training flow in one call: export -> prepare -> calibrate -> optimize -> convert -> lower."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx.calibrate import calibrate
from vmq_fx.export import export_model
from vmq_fx.joint_learning import JLSSConfig, jlss
from vmq_fx.passes import lower
from vmq_fx.quantizer import PTQ4VMRecipe, VisualMambaQuantizer, VQRecipe
from vmq_fx.vector_quantize import vector_quantize

__all__ = ["QuantizeResult", "quantize"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced."""

    prepared: fx.GraphModule  # the optimized prepared model (fake quantization), for per-layer inspection
    lowered: fx.GraphModule  # the lowered model (vmq::int8_linear / vmq::vq_linear), what runs and is saved
    seconds: float  # calibration + optimization + convert + lower
    report: object | None  # JLSSReport or VQReport (None without an optimization step)


def quantize(model: nn.Module, recipe: PTQ4VMRecipe | VQRecipe, calibration_images: torch.Tensor,
             optimize: bool = True, steps: int | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize a Vim / VMamba model with a recipe and lower it.

    PTQ4VM recipes run :func:`vmq_fx.jlss` when ``optimize`` (SmoothQuant + PTS otherwise); VQ recipes always run
    :func:`vmq_fx.vector_quantize` (the k-means recipe does no optimization there).

    Args:
        model: an eager model in eval mode.
        recipe: see :class:`vmq_fx.recipes`.
        calibration_images: ``[N, C, H, W]``.
        optimize: run JLSS for PTQ4VM recipes.
        steps: override the optimization steps per block (JLSS or ViM-VQ).
        progress: progress bars.

    Example:
        >>> import vmq_fx
        >>> from vmq_fx.data import calibration_images
        >>> res = vmq_fx.quantize(vmq_fx.models.load_reference("vim-fm-tiny"), vmq_fx.recipes.vimvq(2),
        ...                       calibration_images(256))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    gm = export_model(model, calibration_images[:2]).module()
    if isinstance(recipe, VQRecipe) and steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipe))
    calibrate(prepared, calibration_images, progress=progress)
    report = None
    if isinstance(recipe, VQRecipe):
        report = vector_quantize(prepared, calibration_images, progress=progress)
    elif optimize and recipe.act_granularity == "per_token_static":
        report = jlss(prepared, calibration_images, JLSSConfig(steps=steps), progress=progress)
    lowered = lower(convert_pt2e(copy.deepcopy(prepared)))
    return QuantizeResult(prepared, lowered, time.perf_counter() - t0, report)
