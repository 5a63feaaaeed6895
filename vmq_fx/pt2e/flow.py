"""The whole post-training flow in one call: export -> prepare -> calibrate -> optimize -> convert -> lower."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.data import Dataset
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx.export import export_model
from vmq_fx.pt2e.calibrate import calibrate
from vmq_fx.pt2e.diagnostics import layer_errors
from vmq_fx.pt2e.lowering import lower
from vmq_fx.pt2e.observers import VectorQuantizedWeight
from vmq_fx.pt2e.quantizer import VisualMambaQuantizer
from vmq_fx.pt2e.recipes import Recipe, check_field_types, family_of, parse_name
from vmq_fx.pt2e.utils import example_images, linear_quantizers
from vmq_fx.pt2e.vq import kmeans_assignment

__all__ = ["QuantizeResult", "method_from_name", "quantize"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced."""

    prepared: fx.GraphModule  # the optimized prepared model (fake quantization), for per-layer inspection
    lowered: fx.GraphModule  # the lowered model (vmq::int8_linear / vmq::vq_linear), what runs and is saved
    seconds: float  # calibration + optimization + convert + lower
    report: object | None  # JLSSReport or VQReport (None without an optimization step)
    errors_init: dict[str, float] | None = None  # per-layer output error after calibration (VQ: plain k-means)
    errors_final: dict[str, float] | None = None  # ... and after optimization (see vmq_fx.pt2e.diagnostics.layer_errors)


def method_from_name(name: str) -> tuple[Recipe, object | None]:
    """A method name, as the CLI and the benchmarks take it, as its recipe and the run-level config of the recipe's
    optimization: the bracketed fields the recipe does not have go to the config (``None`` when there are none).

    Raises:
        ValueError: an unknown name or field.

    Example:
        >>> recipe, config = method_from_name("vimvq-2bit[codebook=layer,lr_codebook=0.001,steps=100]")
        >>> recipe.name, config.lr_codebook, config.steps
        ("vimvq-2bit[codebook='layer']", 0.001, 100)
    """
    family, fields, other = parse_name(name)
    recipe = family.recipe_type(**fields)
    if not other:
        return recipe, None
    if family.config is None or not recipe.optimizes:
        raise ValueError(f"{name}: {recipe.name} has no optimization step, so no field {sorted(other)[0]!r}")
    config_type = family.config_type()
    unknown = sorted(set(other) - {f.name for f in dataclasses.fields(config_type)})
    if unknown:
        raise ValueError(f"{name}: neither {type(recipe).__name__} nor {config_type.__name__} has a field "
                         f"{unknown[0]!r}")
    check_field_types(config_type, other)
    return recipe, config_type(**other)


def quantize(model: nn.Module, recipe: Recipe | VisualMambaQuantizer, calibration_images: torch.Tensor | Dataset,
             config: object | None = None, progress: bool = True,
             diagnostic_images: torch.Tensor | None = None) -> QuantizeResult:
    """Quantize a Vim / VMamba model with a recipe (or a configured quantizer) and lower it: export, prepare,
    calibrate, the recipe family's optimization (:func:`vmq_fx.jlss` or :func:`vmq_fx.vector_quantize`; none for the
    calibration-only baselines), convert, lower.

    Args:
        model: an eager model in eval mode.
        recipe: see :mod:`vmq_fx.pt2e.recipes`, or a :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer` (mixed
            precision).
        calibration_images: ``[N, C, H, W]``, or a map-style ``Dataset`` of images (under ``torchrun`` each process
            then reads only the images it computes on).
        config: the optimization's run-level settings: a :class:`~vmq_fx.pt2e.jlss.JLSSConfig` for PTQ4VM recipes,
            a :class:`~vmq_fx.pt2e.vq.VQConfig` for ViM-VQ ones (``None``: its defaults). Refused for recipes without
            an optimization step (``sq-pts``, ``per-tensor``, ``vq-kmeans`` ...).
        progress: progress bars.
        diagnostic_images: when given, per-layer output errors are measured on them after calibration and after
            optimization (not counted in ``seconds``).

    Example:
        >>> import vmq_fx
        >>> from vmq_fx.app.data import calibration_images
        >>> res = vmq_fx.quantize(vmq_fx.models.load_reference("vim-fm-tiny"), vmq_fx.recipes.vimvq(2),
        ...                       calibration_images(64), vmq_fx.VQConfig(steps=2, batch_size=16), progress=False)
        >>> sorted({str(n.target)[4:-8] for n in res.lowered.graph.nodes if str(n.target).startswith("vmq.")})
        ['add_rms_norm', 'causal_conv1d', 'rms_norm', 'selective_scan', 'vq_linear']
    """
    quantizer = recipe if isinstance(recipe, VisualMambaQuantizer) else VisualMambaQuantizer(recipe)
    recipes = quantizer.spec.recipes()
    family = family_of(recipes[0]) if recipes else None  # one family per model (the quantizer checks)
    optimizing = [r for r in recipes if r.optimizes]
    if config is not None:
        if not optimizing:
            raise ValueError(f"quantize: {', '.join(r.name for r in recipes)} has no optimization step; a config "
                             "(steps, batch size, learning rates) does not apply")
        if not isinstance(config, family.config_type()):
            raise TypeError(f"quantize: {optimizing[0].name} is optimized with a {family.config_type().__name__}, "
                            f"got a {type(config).__name__}")
    t0 = time.perf_counter()
    gm = export_model(model, example_images(calibration_images, 2)).module()
    prepared = prepare_pt2e(gm, quantizer)
    calibrate(prepared, calibration_images, progress=progress)
    errors_init = None
    if diagnostic_images is not None:
        t1 = time.perf_counter()
        vq = [w for _, _, w in linear_quantizers(prepared).values() if isinstance(w, VectorQuantizedWeight)]
        with kmeans_assignment(vq):
            errors_init = layer_errors(prepared, diagnostic_images)
        t0 += time.perf_counter() - t1
    report = None
    if optimizing:
        report = family.optimize()(prepared, calibration_images, config, progress=progress)
    t1 = time.perf_counter()
    errors_final = None if diagnostic_images is None else layer_errors(prepared, diagnostic_images)
    # The copy is the one kept for inspection: convert_pt2e must run on the original, whose quantization
    # annotations point at its own nodes (a deep copy's still point at the original's, which torchao's
    # PortNodeMetaForQDQ then searches for dynamic quantization's choose_qparams without end).
    inspected = copy.deepcopy(prepared)
    t0 += time.perf_counter() - t1
    lowered = lower(convert_pt2e(prepared))
    if hasattr(model, "config"):
        lowered.meta["vmq_config"] = model.config  # save_quantized records it in the file
    seconds = time.perf_counter() - t0
    return QuantizeResult(inspected, lowered, seconds, report, errors_init, errors_final)
