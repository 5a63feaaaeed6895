"""Calibration of a model prepared with :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer`.

For a vector-quantization recipe, calibration records the weights and fits each layer's k-means codebook.

PTQ4VM's calibration has two passes over the calibration images:

1. with the smoothing scales at 1, record each quantized linear's per-channel input maximum, then set
   ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` (SmoothQuant; clamped as in the authors' code);
2. record the per-token statistics of the smoothed inputs ``x / s`` and the smoothed weights ``W * s``, and
   initialize every step size by the Lp (p = 2.4) searches.

A rotation (``recipe.rotation``) is set before the second pass: a Hadamard one needs no data, a KLT one is fitted on
the second moments of the first pass's inputs (divided by ``s s^T`` when the layer smooths, which is the second
moment of ``x / s``), so it costs no extra pass. Outlier channels (``recipe.outlier_fraction``) are the largest
channels of the first pass's ``max|x| / s``; the second pass records them apart, and they get their own 8-bit steps.

Without smoothing, a KLT rotation or outlier channels only the second pass runs. Each linear follows its own recipe
(``node.meta["vmq_linear"].recipe``), so mixed-precision models calibrate in the same two passes.

Under ``torchrun`` each process runs (and, from a map-style dataset, reads) a contiguous share of the batches
(:func:`vmq_fx.distributed.batch_shard`) and the activation quantizers combine their statistics after each pass
(:meth:`~vmq_fx.pt2e.observers.PerTokenStaticFakeQuantize.all_reduce_statistics`), so every process ends with the
same quantizers: maxima exactly those of one process, step sizes from merged histograms.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Iterable

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from vmq_fx import distributed
from vmq_fx.pt2e.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize
from vmq_fx.pt2e.observers.codebook import initialize_codebook_group
from vmq_fx.pt2e.rotation import hadamard, klt
from vmq_fx.pt2e.utils import codebook_groups, is_image_dataset, linear_quantizers, split_batches

log = logging.getLogger(__name__)

__all__ = ["calibrate", "smoothquant_scales"]

_ACT_CLAMP, _WEIGHT_CLAMP, _SCALE_CLAMP = 1e-3, 1e-5, 1e-5


def smoothquant_scales(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """``max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` per input channel j, with PTQ4VM's clamps."""
    a = act_absmax.float().clamp(min=_ACT_CLAMP)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=_WEIGHT_CLAMP)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=_SCALE_CLAMP)


_EMPTY = "calibration data is empty: pass calibration images (e.g. vmq_fx.app.data.calibration_images())"


def _check_inputs(gm: fx.GraphModule, batches: list[Tensor]) -> None:
    if sum(len(b) for b in batches) == 0:
        raise ValueError(_EMPTY)
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


def _initialize_codebooks(group: list, key: str) -> None:
    """Fit a codebook group; layers whose recipe has no optimization (plain k-means) keep the nearest codewords, as
    convert_pt2e will write them."""
    initialize_codebook_group([w for _, w in group], key)
    for layer, w in group:
        if not layer.recipe.optimizes:
            w.harden()
            w.finalize()


def calibrate(prepared: fx.GraphModule, data: Tensor | Iterable, batch_size: int = 64, progress: bool = True) -> None:
    """Calibrate a prepared model in place: smoothing scales and rotations (if the recipe has them) and initial step
    sizes.

    Args:
        prepared: the output of ``prepare_pt2e(gm, VisualMambaQuantizer(recipe))``.
        data: calibration images: a tensor [N, C, H, W], a map-style ``Dataset`` of images or (image, label) pairs
            (under ``torchrun`` each process reads only its batches), or an iterable of tensors / (tensor, label)
            pairs taken as the batches.
        batch_size: batch size for a tensor or a dataset (under ``torchrun`` at most ``N / processes``, so that every
            process has a batch).
        progress: show progress bars.

    Example:
        >>> import torch, vmq_fx
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        >>> gm = vmq_fx.export_model(vmq_fx.models.create_model("vim_fm_tiny").eval(),
        ...                          torch.randn(2, 1, 28, 28)).module()
        >>> prepared = prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.pt2e.recipes.ptq4vm(8, 8)))
        >>> vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    """
    quantizers = linear_quantizers(prepared)
    if (isinstance(data, Tensor) or is_image_dataset(data)) and distributed.world_size() > 1:  # a batch for each
        batch_size = max(1, min(batch_size, -(-len(data) // distributed.world_size())))
    batches = split_batches(data, batch_size)
    if len(batches) == 0:
        raise ValueError(_EMPTY)
    if len(batches) < distributed.world_size():
        raise ValueError(f"calibration has {len(batches)} batches for {distributed.world_size()} processes: every "
                         "process needs one (more images or a smaller batch size)")
    share = distributed.batch_shard(len(batches), 1)
    batches = list(batches[share.start:share.stop])  # a dataset is read here: this process's batches only
    _check_inputs(prepared, batches)
    activations = [act for _, act, _ in quantizers.values() if isinstance(act, PerTokenStaticFakeQuantize)]
    first_pass = [(layer, act, weight) for layer, act, weight in quantizers.values()
                  if isinstance(act, PerTokenStaticFakeQuantize)
                  and (act.smoothing or act.records_second_moment or act.outlier_fraction)]
    seconds = {}
    t0 = time.perf_counter()
    if first_pass:
        for _, act, _ in first_pass:  # this pass needs the channel maxima (and second moments) only
            act.record_distribution = False
        _run(prepared, batches, "calibrate (smoothing, rotations)", progress)
        for _, act, _ in first_pass:
            act.all_reduce_statistics()
        for layer, act, weight in first_pass:
            act.record_distribution = True
            if act.smoothing:
                alpha = layer.recipe.alpha if layer.recipe.alpha is not None else (
                    0.65 if layer.family == "vmamba" else 0.5)
                w = prepared.get_parameter(layer.name + ".weight")
                weight.share_smooth(act.set_smooth(smoothquant_scales(act.channel_absmax, w, alpha)))
            if act.records_second_moment:
                moment = act.second_moment
                if act.smooth is not None:
                    s = act.smooth.detach().double()
                    moment = moment / torch.outer(s, s)
                weight.share_rotation(act.set_rotation(klt(moment)))
            if act.outlier_fraction:
                absmax = act.channel_absmax if act.smooth is None else act.channel_absmax / act.smooth.detach()
                k = math.ceil(act.outlier_fraction * absmax.numel())
                act.set_outlier_channels(absmax.topk(k).indices, absmax.numel())
        for _, act, weight in quantizers.values():
            for q in (act, weight):
                if q is not None:
                    q.reset_statistics()
        seconds["smoothing / rotation pass"] = time.perf_counter() - t0
    for layer, act, weight in quantizers.values():
        if isinstance(act, PerTokenStaticFakeQuantize) and act.rotation == "hadamard":
            d = prepared.get_parameter(layer.name + ".weight").shape[1]
            weight.share_rotation(act.set_rotation(hadamard(d)))
    t0 = time.perf_counter()
    _run(prepared, batches, "calibrate (step sizes)", progress)
    for act in activations:
        act.all_reduce_statistics()
    seconds["statistics pass"] = time.perf_counter() - t0
    modules = [q for _, act, weight in quantizers.values()
               for q in (act, weight, getattr(act, "outliers", None))]
    searched = [q for q in modules if isinstance(q, (PerTokenStaticFakeQuantize, PerChannelWeightFakeQuantize))]
    # Under torchrun the processes share out the range searches (same statistics everywhere) and swap the results.
    mine = range(distributed.rank(), len(searched), distributed.world_size())
    initialize = [searched[i].initialize for i in mine]
    initialize += [lambda key=key, g=group: _initialize_codebooks(g, key)
                   for key, group in codebook_groups(quantizers).items()]
    t0 = time.perf_counter()
    for init in tqdm(initialize, desc="initialize quantizers", disable=not progress, leave=False):
        init()
    if distributed.world_size() > 1:
        found = distributed.all_gather_objects([(i, *searched[i].calculate_qparams()) for i in mine])
        for i, scale, zero_point in (entry for part in found for entry in part):
            if i not in mine:
                searched[i].adopt(scale, zero_point)
    seconds["range searches and k-means"] = time.perf_counter() - t0
    log.info("calibration: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
