"""ViM-VQ: convex-combination optimization of vector-quantized weights with incremental confirmation, block by block.

After :func:`vmq_fx.calibrate` has fit the k-means codebooks (one per block, or per layer), for each block in order:

* target: the floating-point block's output on floating-point inputs; input: the output of the already-quantized
  preceding blocks (the reconstruction set-up of :class:`vmq_fx.pt2e.blockwise.BlockRunner`);
* loss: mean over tokens of ``1 - cos`` between target and output, plus ``reg * t / T`` times the one-hot penalty
  ``n * mean(r (1 - r))`` of the unconfirmed ratios (``t`` the step, ``T`` the steps: the push grows over time);
* learned: every layer's ratio logits and the block's codebook(s), with Adam;
* every ``reselect_every`` steps the unconfirmed sub-vectors get the ``n`` codewords nearest their current soft value
  as new candidates (the hulls move);
* ``"incremental"``: from ``confirm_start * T`` on, ``confirm_rounds`` rounds hard-assign the most confident
  sub-vectors until all are hard at step ``T``; ``"convex"``: every sub-vector is rounded at step ``T``;
  ``"kmeans"``: no optimization, nearest codewords.

The codebooks end in float16, the precision ``convert_pt2e`` stores them in.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import fx
from tqdm.auto import tqdm

from vmq_fx.pt2e.blockwise import BlockRunner
from vmq_fx.pt2e.jlss import resolved_schedule
from vmq_fx.pt2e.memory import PeakRSS
from vmq_fx.pt2e.utils import linear_quantizers, split_batches
from vmq_fx.pt2e.observers import VectorQuantizedWeight
from vmq_fx.pt2e.recipes import Schedule, VQRecipe

__all__ = ["VQReport", "kmeans_assignment", "vector_quantize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VQReport:
    """What :func:`vector_quantize` did: per-block loss after k-means and at the end, time and peak memory."""

    method: str
    blocks: int
    layers: int
    loss_kmeans: list[float]
    loss_after: list[float]
    seconds: float
    peak_rss_bytes: int  # peak resident memory of the process while it ran
    start_rss_bytes: int  # resident memory when it started: the peak minus this is what the optimization added

    def __str__(self) -> str:
        before, after = sum(self.loss_kmeans) / self.blocks, sum(self.loss_after) / self.blocks
        return (f"ViM-VQ ({self.method}): {self.layers} layers in {self.blocks} blocks, {self.seconds:.1f} s, peak RSS "
                f"+{(self.peak_rss_bytes - self.start_rss_bytes) / 2**20:.0f} MiB over the start; mean block loss "
                f"(1 - cos) k-means {before:.4g} -> {after:.4g}")


def _confirm_schedule(recipe: VQRecipe, steps: int) -> dict[int, float]:
    """Step (1-based) -> fraction confirmed after it; the last round is at the last step with fraction 1."""
    rounds, start = recipe.confirm_rounds, recipe.confirm_start
    return {max(1, int(steps * (start + (1 - start) * r / rounds))): r / rounds for r in range(1, rounds + 1)}


def vector_quantize(prepared: fx.GraphModule, calibration_data, schedule: Schedule | None = None,
                    progress: bool = True) -> VQReport:
    """Optimize the vector-quantized weights of a calibrated prepared model block by block (in place).

    Args:
        prepared: ``prepare_pt2e(gm, VisualMambaQuantizer(recipes.vimvq(bits)))`` after :func:`vmq_fx.calibrate`
            (which fits the k-means codebooks).
        calibration_data: the calibration images (tensor ``[N, C, H, W]`` or iterable of batches).
        schedule: steps per block, images per step, seed (default: the global recipe's; unset fields: 100 steps of
            64 images).
        progress: one progress bar per block.

    Returns:
        A :class:`VQReport`; afterwards every sub-vector is assigned and ``convert_pt2e`` writes the codes.

    Example:
        >>> import torch, vmq_fx
        >>> from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
        >>> gm = vmq_fx.export_model(vmq_fx.models.create_model("vim_fm_tiny", depth=2).eval(),
        ...                          torch.randn(2, 1, 28, 28)).module()
        >>> recipe = recipes.vimvq(None, k=16, d=4, schedule=recipes.Schedule(steps=4))
        >>> prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipe))
        >>> calib = torch.randn(16, 1, 28, 28)
        >>> vmq_fx.calibrate(prepared, calib, progress=False)
        >>> report = vmq_fx.vector_quantize(prepared, calib, progress=False)
        >>> quantized = convert_pt2e(prepared)
    """
    quantizers = linear_quantizers(prepared)
    kinds = {type(layer.recipe).__name__ for layer, _, _ in quantizers.values()}
    if kinds != {"VQRecipe"}:
        raise ValueError("vector_quantize needs a model prepared with a VQ recipe (recipes.vimvq / vq_convex / "
                         f"vq_kmeans), got {', '.join(sorted(kinds))}")
    settings = prepared.meta.get("vmq_quantizer")
    first = next(iter(quantizers.values()))[0]
    recipe = settings.global_recipe if settings is not None and settings.global_recipe is not None else first.recipe
    if not all(w.initialized for _, _, w in quantizers.values()):
        raise ValueError("vector_quantize: the prepared model is not calibrated (no codebooks); run "
                         "vmq_fx.calibrate(prepared, data) first")
    images = torch.cat(split_batches(calibration_data, 256))
    if len(images) == 0:
        raise ValueError("vector_quantize: calibration data is empty")
    t0 = time.perf_counter()
    if recipe.optimizer is None and schedule is not None:
        raise ValueError(f"vector_quantize: {recipe.name} has no optimization step; a schedule does not apply")
    steps, batch_size, seed = resolved_schedule(schedule or recipe.schedule, first.family, "vimvq")
    gen = torch.Generator().manual_seed(seed)
    confirmation = _confirm_schedule(recipe, steps)
    optimize = recipe.optimizer is not None and steps > 0
    with PeakRSS() as rss:
        runner = BlockRunner(prepared, images)
        loss_kmeans, loss_after = [], []
        for k, block in enumerate(runner.blocks):
            mods: list[VectorQuantizedWeight] = [w for _, _, w in runner.layers(k)]
            _, fp_out = runner.capture(k, fake_quant=False)
            q_in, _ = runner.capture(k, fake_quant=True)
            loss_kmeans.append(_kmeans_loss(runner, k, mods, q_in, fp_out))
            if optimize:
                _optimize_block(runner, k, block, mods, q_in, fp_out, recipe, steps, batch_size, confirmation, gen,
                                progress)
            for m in mods:
                m.harden()
                m.finalize()
            with torch.no_grad():
                loss_after.append(runner.loss(k, q_in, fp_out).item())
    report = VQReport(recipe.method, len(runner.blocks), len(quantizers), loss_kmeans, loss_after,
                      time.perf_counter() - t0, rss.peak, rss.start)
    log.info("%s", report)
    return report


@contextlib.contextmanager
def kmeans_assignment(modules: list[VectorQuantizedWeight]):
    """Temporarily put every sub-vector of freshly initialized ``modules`` at its nearest codeword (the codes
    ``initialize`` left), i.e. plain k-means VQ."""
    saved = [m.confirmed.clone() for m in modules]
    for m in modules:
        m.confirmed.fill_(True)
    try:
        yield
    finally:
        for m, confirmed in zip(modules, saved):
            m.confirmed.copy_(confirmed)


@torch.no_grad()
def _kmeans_loss(runner, k, mods, q_in, fp_out) -> float:
    with kmeans_assignment(mods):
        return runner.loss(k, q_in, fp_out).item()


def _optimize_block(runner, k, block, mods, q_in, fp_out, recipe: VQRecipe, steps: int, batch_size: int,
                    confirmation: dict[int, float], gen, progress) -> None:
    logits = [m.logits for m in mods]
    codebooks = list({id(m.codebook): m.codebook for m in mods}.values())  # a block's shared codebook once
    opt = torch.optim.Adam([{"params": logits, "lr": recipe.lr_ratio},
                            {"params": codebooks, "lr": recipe.lr_codebook}])
    frozen = runner.frozen_except(logits + codebooks)
    n = len(runner.images)
    try:
        bar = tqdm(range(1, steps + 1), desc=f"ViM-VQ {block}", disable=not progress, leave=False)
        for step in bar:
            idx = None if batch_size >= n else torch.randperm(n, generator=gen)[:batch_size]
            recon = runner.loss(k, q_in, fp_out, idx)
            penalty = torch.stack([m.one_hot_penalty() for m in mods]).mean()
            loss = recon + recipe.reg * step / steps * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if recipe.method == "incremental" and step in confirmation:
                for m in mods:
                    m.confirm(confirmation[step])
            elif recipe.reselect_every and step % recipe.reselect_every == 0 and step < steps:
                for m in mods:
                    m.reselect()
                    opt.state.pop(m.logits, None)  # the moments belonged to the old candidates
            bar.set_postfix(loss=f"{recon.item():.4g}", refresh=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
