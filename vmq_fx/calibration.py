"""Calibration of a model prepared with :class:`~vmq_fx.quantizer.VisualMambaQuantizer`.

For a vector-quantization recipe, calibration records the weights and fits each layer's k-means codebook.

PTQ4VM's calibration has two passes over the calibration images:

1. with the smoothing scales at 1, record each quantized linear's per-channel input maximum, then set
   ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` (SmoothQuant; clamped as in the authors' code);
2. record the per-token statistics of the smoothed inputs ``x / s`` and the smoothed weights ``W * s``, and
   initialize every step size by the Lp (p = 2.4) searches.

Without smoothing (``recipe.smooth=False``) only the second pass runs. Each linear follows its own recipe
(``node.meta["vmq_linear"].recipe``), so mixed-precision models calibrate in the same two passes.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from vmq_fx.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize, VectorQuantizedWeight
from vmq_fx.observers.codebook import initialize_codebook_group
from vmq_fx.quantizer import QuantizedLinear, quantized_linears

log = logging.getLogger(__name__)

__all__ = ["calibrate", "codebook_groups", "linear_quantizers", "set_fake_quant", "smoothquant_scales",
           "split_batches"]

_ACT_CLAMP, _WEIGHT_CLAMP, _SCALE_CLAMP = 1e-3, 1e-5, 1e-5


def smoothquant_scales(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """``max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` per input channel j, with PTQ4VM's clamps."""
    a = act_absmax.float().clamp(min=_ACT_CLAMP)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=_WEIGHT_CLAMP)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=_SCALE_CLAMP)


def linear_quantizers(gm: fx.GraphModule) -> dict[str, tuple[QuantizedLinear, torch.nn.Module | None, torch.nn.Module]]:
    """For each linear a :class:`~vmq_fx.quantizer.VisualMambaQuantizer` quantized in a prepared model, by node name:
    (layer, activation quantizer or ``None`` for weight-only recipes, weight quantizer), read from the graph: the
    observer modules in front of the linear."""
    out = {}
    for name, layer in quantized_linears(gm).items():
        node = next(n for n in gm.graph.nodes if n.name == name)
        weight_only = layer.recipe.act_qspec() is None
        mods = []
        for i, arg in enumerate(node.args[:2]):
            if i == 0 and weight_only:
                mods.append(None)
                continue
            if not (isinstance(arg, fx.Node) and arg.op == "call_module"):
                raise ValueError(f"{layer.name}: expected an observer in front of the linear; was the model prepared "
                                 "with prepare_pt2e and not converted yet?")
            mods.append(gm.get_submodule(str(arg.target)))
        out[name] = (layer, mods[0], mods[1])
    return out


def codebook_groups(quantizers: dict) -> dict[str, list[tuple[QuantizedLinear, VectorQuantizedWeight]]]:
    """The vector-quantized linears of a :func:`linear_quantizers` table by the codebook they share, keyed by the
    codebook's buffer name after convert: one group per block (``recipe.codebook == "block"``, linears of the same
    recipe) or per linear."""
    groups: dict[str, list] = {}
    recipes: dict[str, object] = {}
    for layer, _, weight in quantizers.values():
        if not isinstance(weight, VectorQuantizedWeight):
            continue
        scope = layer.block if layer.recipe.codebook == "block" else layer.name
        key = f"vq_codebook_{scope}".replace(".", "_")
        while key in recipes and recipes[key] != layer.recipe:  # another recipe in the same block: its own codebook
            key += "_"
        recipes[key] = layer.recipe
        groups.setdefault(key, []).append((layer, weight))
    return groups


def set_fake_quant(quantizers: dict, enabled: bool) -> None:
    """Switch fake quantization of every quantizer in a :func:`linear_quantizers` table on or off."""
    for _, act, weight in quantizers.values():
        for q in (act, weight):
            if q is not None:
                q.enable_fake_quant(enabled)


def split_batches(data, batch_size: int) -> list[Tensor]:
    """Calibration data as a list of image batches: a tensor is split, an iterable's items (or their first
    element, for (image, label) pairs) are taken as they are."""
    if isinstance(data, Tensor):
        return list(data.split(batch_size))
    out = []
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(f"calibration data must yield tensors or (tensor, label) pairs, got {type(x).__name__}")
        out.append(x)
    return out


def _check_inputs(gm: fx.GraphModule, batches: list[Tensor]) -> None:
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("calibration data is empty: pass calibration images (e.g. vmq_fx.data.calibration_images())")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val = placeholders[0].meta.get("val") if placeholders else None
    if val is None:
        return
    expected = tuple(val.shape[1:])
    static_batch = val.shape[0] if isinstance(val.shape[0], int) else None
    for b in batches:
        if static_batch is not None and b.shape[0] != static_batch:
            raise ValueError(
                f"the model was exported with a static batch of {static_batch}, calibration batches have "
                f"{b.shape[0]} images: export with a dynamic batch (vmq_fx.export_model)"
            )
        if tuple(b.shape[1:]) != expected:
            raise ValueError(
                f"calibration images have shape {tuple(b.shape)} but the model was exported for [batch, "
                f"{', '.join(str(int(d)) for d in expected)}]: the token count is fixed at export"
            )


def _run(gm: fx.GraphModule, batches: list[Tensor], desc: str, progress: bool) -> None:
    with torch.no_grad():
        for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
            gm(x)


def calibrate(prepared: fx.GraphModule, data: Tensor | Iterable, batch_size: int = 64, progress: bool = True) -> None:
    """Calibrate a prepared model in place: smoothing scales (if the recipe smooths) and initial step sizes.

    Args:
        prepared: the output of ``prepare_pt2e(gm, VisualMambaQuantizer(recipe))``.
        data: calibration images, a tensor [N, C, H, W] or an iterable of tensors / (tensor, label) pairs.
        batch_size: split size when ``data`` is one tensor.
        progress: show progress bars.

    Example:
        >>> import torch, vmq_fx
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        >>> gm = vmq_fx.export_model(vmq_fx.models.create_model("vim_fm_tiny").eval(),
        ...                          torch.randn(2, 1, 28, 28)).module()
        >>> prepared = prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.recipes.ptq4vm(8, 8)))
        >>> vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    """
    quantizers = linear_quantizers(prepared)
    batches = split_batches(data, batch_size)
    _check_inputs(prepared, batches)
    smoothed = [(layer, act, weight) for layer, act, weight in quantizers.values()
                if isinstance(act, PerTokenStaticFakeQuantize) and act.smoothing]
    seconds = {}
    t0 = time.perf_counter()
    if smoothed:
        for _, act, _ in smoothed:  # this pass needs the channel maxima only
            act.record_distribution = False
        _run(prepared, batches, "calibrate (smoothing)", progress)
        for layer, act, weight in smoothed:
            act.record_distribution = True
            alpha = layer.recipe.alpha if layer.recipe.alpha is not None else (0.65 if layer.family == "vmamba" else 0.5)
            w = prepared.get_parameter(layer.name + ".weight")
            weight.share_smooth(act.set_smooth(smoothquant_scales(act.channel_absmax, w, alpha)))
        for _, act, weight in quantizers.values():
            for q in (act, weight):
                if q is not None:
                    q.reset_statistics()
        seconds["smoothing pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run(prepared, batches, "calibrate (step sizes)", progress)
    seconds["statistics pass"] = time.perf_counter() - t0
    modules = [q for _, act, weight in quantizers.values() for q in (act, weight)]
    initialize = [q.initialize for q in modules if isinstance(q, (PerTokenStaticFakeQuantize,
                                                                  PerChannelWeightFakeQuantize))]
    initialize += [lambda key=key, g=group: initialize_codebook_group([w for _, w in g], key)
                   for key, group in codebook_groups(quantizers).items()]
    t0 = time.perf_counter()
    for init in tqdm(initialize, desc="initialize quantizers", disable=not progress, leave=False):
        init()
    seconds["range searches and k-means"] = time.perf_counter() - t0
    log.info("calibration: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
