"""ViM-VQ: convex-combination optimization of vector-quantized weights with incremental confirmation, block by block.

After :func:`vmq_fx.calibrate` has fit the k-means codebooks (one per block, or per layer), for each block in order:

* target: the floating-point block's output on floating-point inputs; input: the output of the already-quantized
  preceding blocks (the reconstruction set-up of :class:`vmq_fx.pt2e.blockwise.BlockRunner`);
* loss: mean over tokens of ``1 - cos`` between target and output, plus ``reg * t / T`` times the one-hot penalty
  ``n * mean(r (1 - r))`` of the unconfirmed ratios (``t`` the step, ``T`` the steps: the push grows over time);
* learned: every layer's ratio logits and the block's codebook(s), with Adam (the shared per-block loop,
  :func:`vmq_fx.pt2e.blockwise.optimize_blocks`);
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

from vmq_fx.pt2e.blockwise import BlockMethod, BlockRunner, optimize_blocks
from vmq_fx.pt2e.memory import PeakRSS
from vmq_fx.pt2e.observers import VectorQuantizedWeight
from vmq_fx.pt2e.recipes import VQRecipe
from vmq_fx.pt2e.utils import linear_quantizers

__all__ = ["VQConfig", "VQReport", "kmeans_assignment", "vector_quantize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VQConfig:
    """How :func:`vector_quantize` runs (the run-level settings; the codebooks' shapes and the method are the
    layers' :class:`~vmq_fx.pt2e.recipes.VQRecipe`).

    The defaults are those the seeded accuracy table supports (``bench/results/vimvq_accuracy.md``): 400 steps with a
    codebook learning rate of 0.01 are the only measured setting with 3-bit within 0.3 and 2-bit within 1.0 points of
    FP32 on all three shipped models. The paper's schedule, 100 steps at 0.001, loses 1.55 points at 2 bits on
    vim-fm-197 (``VQConfig(steps=100, lr_codebook=1e-3)`` keeps it; it is 4x faster).

    Args:
        steps: optimization steps per block.
        batch_size: calibration images per step.
        seed: seed of the mini-batch sampling.
        lr_ratio, lr_codebook: Adam learning rates of the ratio logits and of the codebook.
        reg: weight of the one-hot regularizer ``n * mean(r (1 - r))`` at the end of a block's schedule (it grows
            linearly from 0).
        reselect_every: steps between candidate re-selections (0: never).
        confirm_start: fraction of the steps after which confirmation starts (``"incremental"`` method).
        confirm_rounds: confirmation rounds; round ``r`` of ``R`` leaves ``r / R`` of the sub-vectors confirmed.
    """

    steps: int = 400
    batch_size: int = 64
    seed: int = 0
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-2
    reg: float = 1e-3
    reselect_every: int = 20
    confirm_start: float = 0.3
    confirm_rounds: int = 8

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"VQConfig: steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"VQConfig: batch_size must be a positive integer, got {self.batch_size!r}")
        if self.lr_ratio < 0 or self.lr_codebook < 0 or self.reg < 0 or self.reselect_every < 0:
            raise ValueError("VQConfig: lr_ratio, lr_codebook, reg and reselect_every must be >= 0")
        if self.confirm_rounds < 1 or not 0 <= self.confirm_start < 1:
            raise ValueError("VQConfig: confirm_rounds >= 1 and 0 <= confirm_start < 1")


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


def _confirm_schedule(config: VQConfig, steps: int) -> dict[int, float]:
    """Step (1-based) -> fraction confirmed after it; the last round is at the last step with fraction 1."""
    rounds, start = config.confirm_rounds, config.confirm_start
    return {max(1, int(steps * (start + (1 - start) * r / rounds))): r / rounds for r in range(1, rounds + 1)}


def vector_quantize(prepared: fx.GraphModule, calibration_data, config: VQConfig | None = None,
                    progress: bool = True) -> VQReport:
    """Optimize the vector-quantized weights of a calibrated prepared model block by block (in place).

    Args:
        prepared: ``prepare_pt2e(gm, VisualMambaQuantizer(recipes.vimvq(bits)))`` after :func:`vmq_fx.calibrate`
            (which fits the k-means codebooks).
        calibration_data: the calibration images (tensor ``[N, C, H, W]``, map-style dataset of images, or
            iterable of batches; see :mod:`vmq_fx.pt2e.utils`).
        config: steps, images per step, seed, learning rates, confirmation (default :class:`VQConfig()`: 400 steps
            of 64 images).
        progress: one progress bar per block.

    Returns:
        A :class:`VQReport`; afterwards every sub-vector is assigned and ``convert_pt2e`` writes the codes.

    Example:
        >>> import torch, vmq_fx
        >>> from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
        >>> gm = vmq_fx.export_model(vmq_fx.models.create_model("vim_fm_tiny", depth=2).eval(),
        ...                          torch.randn(2, 1, 28, 28)).module()
        >>> prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipes.vimvq(None, k=16, d=4)))
        >>> calib = torch.randn(16, 1, 28, 28)
        >>> vmq_fx.calibrate(prepared, calib, progress=False)
        >>> report = vmq_fx.vector_quantize(prepared, calib, vmq_fx.VQConfig(steps=4), progress=False)
        >>> quantized = convert_pt2e(prepared)
    """
    given, config = config is not None, VQConfig() if config is None else config
    if not isinstance(config, VQConfig):
        raise TypeError(f"vector_quantize: config must be a VQConfig, got {type(config).__name__}")
    quantizers = linear_quantizers(prepared)
    kinds = {type(layer.recipe).__name__ for layer, _, _ in quantizers.values()
             if not isinstance(layer.recipe, VQRecipe)}
    if kinds:
        raise ValueError("vector_quantize needs a model prepared with a VQ recipe (recipes.vimvq / vq_convex / "
                         f"vq_kmeans), got {', '.join(sorted(kinds))}")
    methods = {layer.recipe.method for layer, _, _ in quantizers.values()}
    if len(methods) > 1:
        raise ValueError(f"vector_quantize: one method per model, got {', '.join(sorted(methods))}")
    if given and methods == {"kmeans"}:
        raise ValueError("vector_quantize: plain k-means (vq-kmeans) has no optimization; a VQConfig does not apply")
    if not all(w.initialized for _, _, w in quantizers.values()):
        raise ValueError("vector_quantize: the prepared model is not calibrated (no codebooks); run "
                         "vmq_fx.calibrate(prepared, data) first")
    t0 = time.perf_counter()
    method = methods.pop()
    with PeakRSS() as rss:
        runner = BlockRunner(prepared, calibration_data)
        steps = config.steps if method != "kmeans" else 0
        losses = optimize_blocks(runner, _ViMVQ(config, method, steps), steps, config.batch_size, config.seed,
                                 "ViM-VQ", progress)
    report = VQReport(method, len(runner.blocks), len(quantizers), losses.before, losses.after,
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


class _ViMVQ(BlockMethod):
    """ViM-VQ in the shared per-block loop: Adam on the ratio logits and the block's codebook(s), candidate
    re-selection, incremental confirmation, and hard assignment at the end of each block."""

    def __init__(self, config: VQConfig, method: str, steps: int):
        self.config, self.method = config, method
        self.confirmation = _confirm_schedule(config, steps)
        self.mods: list[VectorQuantizedWeight] = []

    def loss_before(self, runner, k, q_in, fp_out, q_out) -> float:
        self.mods = [w for _, _, w in runner.layers(k)]
        return _kmeans_loss(runner, k, self.mods, q_in, fp_out)  # the loss of plain k-means

    def begin(self, runner, k):
        logits = [m.logits for m in self.mods]
        codebooks = list({id(m.codebook): m.codebook for m in self.mods}.values())  # a block's shared codebook once
        return logits + codebooks, torch.optim.Adam([{"params": logits, "lr": self.config.lr_ratio},
                                                     {"params": codebooks, "lr": self.config.lr_codebook}])

    def penalty(self, step: int, steps: int):
        return self.config.reg * step / steps * torch.stack([m.one_hot_penalty() for m in self.mods]).mean()

    def after_step(self, step: int, steps: int, optimizer) -> None:
        if self.method == "incremental" and step in self.confirmation:
            for m in self.mods:
                m.confirm(self.confirmation[step])
        elif self.config.reselect_every and step % self.config.reselect_every == 0 and step < steps:
            for m in self.mods:
                m.reselect()
                optimizer.state.pop(m.logits, None)  # the moments belonged to the old candidates

    def end(self, runner, k) -> bool:
        for m in self.mods:
            m.harden()
            m.finalize()
        return True
