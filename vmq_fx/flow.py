"""The whole post-training flow in one call: export -> prepare -> calibrate -> optimize -> convert -> lower."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx.calibration import calibrate, linear_quantizers
from vmq_fx.export import export_model
from vmq_fx.joint_learning import JLSSConfig, jlss
from vmq_fx.passes import lower
from vmq_fx.quantizer import PTQ4VMRecipe, VisualMambaQuantizer, VQRecipe
from vmq_fx.observers import VectorQuantizedWeight
from vmq_fx.report import layer_errors
from vmq_fx.vq import kmeans_assignment, vector_quantize

__all__ = ["QuantizeResult", "quantize"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced."""

    prepared: fx.GraphModule  # the optimized prepared model (fake quantization), for per-layer inspection
    lowered: fx.GraphModule  # the lowered model (vmq::int8_linear / vmq::vq_linear), what runs and is saved
    seconds: float  # calibration + optimization + convert + lower
    report: object | None  # JLSSReport or VQReport (None without an optimization step)
    errors_init: dict[str, float] | None = None  # per-layer output error after calibration (VQ: plain k-means)
    errors_final: dict[str, float] | None = None  # ... and after optimization (see vmq_fx.report.layer_errors)


def quantize(model: nn.Module, recipe: PTQ4VMRecipe | VQRecipe, calibration_images: torch.Tensor,
             optimize: bool = True, steps: int | None = None, batch_size: int | None = None, progress: bool = True,
             diagnostic_images: torch.Tensor | None = None) -> QuantizeResult:
    """Quantize a Vim / VMamba model with a recipe and lower it.

    PTQ4VM recipes run :func:`vmq_fx.jlss` when the recipe has ``jlss`` and ``optimize`` is set (the baselines stop
    after calibration); VQ recipes always run :func:`vmq_fx.vector_quantize` (the k-means recipe does no
    optimization there).

    Args:
        model: an eager model in eval mode.
        recipe: see :class:`vmq_fx.recipes`.
        calibration_images: ``[N, C, H, W]``.
        optimize: run JLSS for PTQ4VM recipes.
        steps: override the optimization steps per block (JLSS or ViM-VQ).
        batch_size: override the images per optimization step (JLSS: all calibration images; ViM-VQ: 64).
        progress: progress bars.
        diagnostic_images: when given, per-layer output errors are measured on them after calibration and after
            optimization (not counted in ``seconds``).

    Example:
        >>> import vmq_fx
        >>> from vmq_fx.data import calibration_images
        >>> res = vmq_fx.quantize(vmq_fx.models.load_reference("vim-fm-tiny"), vmq_fx.recipes.vimvq(2),
        ...                       calibration_images(256))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    gm = export_model(model, calibration_images[:2]).module()
    if isinstance(recipe, VQRecipe):
        recipe = dataclasses.replace(recipe, steps=recipe.steps if steps is None else steps,
                                     batch_size=recipe.batch_size if batch_size is None else batch_size)
    prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipe))
    calibrate(prepared, calibration_images, progress=progress)
    errors_init = None
    if diagnostic_images is not None:
        t1 = time.perf_counter()
        vq = [w for _, _, w in linear_quantizers(prepared).values() if isinstance(w, VectorQuantizedWeight)]
        with kmeans_assignment(vq):
            errors_init = layer_errors(prepared, diagnostic_images)
        t0 += time.perf_counter() - t1
    report = None
    if isinstance(recipe, VQRecipe):
        report = vector_quantize(prepared, calibration_images, progress=progress)
    elif optimize and recipe.jlss:
        report = jlss(prepared, calibration_images, JLSSConfig(steps=steps, batch_size=batch_size), progress=progress)
    lowered = lower(convert_pt2e(copy.deepcopy(prepared)))
    seconds = time.perf_counter() - t0
    errors_final = None if diagnostic_images is None else layer_errors(prepared, diagnostic_images)
    return QuantizeResult(prepared, lowered, seconds, report, errors_init, errors_final)
