"""JLSS: Joint Learning of Smoothing scales and Step sizes (PTQ4VM), block by block.

For each block in order, with the weights frozen:

* target: the floating-point block's output on floating-point inputs;
* input: the output of the already-quantized blocks before it (fake quantization on);
* loss: mean over tokens of ``1 - cos`` between the target and the fake-quantized block output along channels;
* learned: the block's weight step sizes (per output channel), activation step sizes (per token) and smoothing
  scales (per input channel), with AdamW (weight decay 1e-5), gradient-norm clip 2.0 and no schedule.

The block-by-block machinery (graph split, input capture, loss) is :class:`vmq_fx.blockwise.BlockRunner`; learning
updates the prepared model in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from vmq_fx.blockwise import BlockRunner
from vmq_fx.calibration import linear_quantizers, split_batches
from vmq_fx.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize

__all__ = ["JLSSConfig", "JLSSReport", "jlss"]


@dataclass(frozen=True)
class JLSSConfig:
    """JLSS hyper-parameters; ``None`` fields take PTQ4VM's per-family defaults.

    Args:
        steps: optimization steps per block (Vim 100, VMamba 400).
        lr_weight, lr_act, lr_smooth: learning rates (Vim 5e-4 / 5e-4 / 1e-2; VMamba 1e-4 for all three).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        batch_size: calibration images per step (``None``: all of them, PTQ4VM's one batch of 256).
        learn_all_projections: also learn x_proj / dt_proj parameters (``None``: the recipe's setting).
        seed: seed of the mini-batch sampling.
    """

    steps: int | None = None
    lr_weight: float | None = None
    lr_act: float | None = None
    lr_smooth: float | None = None
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    batch_size: int | None = None
    learn_all_projections: bool | None = None
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"JLSSConfig: steps must be >= 0, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"JLSSConfig: batch_size must be positive, got {self.batch_size}")

    def resolved(self, family: str, recipe_learn_all: bool) -> "JLSSConfig":
        vim = family == "vim"
        return JLSSConfig(
            steps=self.steps if self.steps is not None else (100 if vim else 400),
            lr_weight=self.lr_weight if self.lr_weight is not None else (5e-4 if vim else 1e-4),
            lr_act=self.lr_act if self.lr_act is not None else (5e-4 if vim else 1e-4),
            lr_smooth=self.lr_smooth if self.lr_smooth is not None else (1e-2 if vim else 1e-4),
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            batch_size=self.batch_size,
            learn_all_projections=(self.learn_all_projections if self.learn_all_projections is not None
                                   else recipe_learn_all),
            seed=self.seed,
        )


@dataclass(frozen=True)
class JLSSReport:
    blocks: int
    loss_before: list[float]
    loss_after: list[float]
    seconds: float

    def __str__(self) -> str:
        before, after = sum(self.loss_before) / self.blocks, sum(self.loss_after) / self.blocks
        return (f"JLSS: {self.blocks} blocks in {self.seconds:.1f} s; mean block loss (1 - cos) "
                f"{before:.4g} -> {after:.4g}")


def jlss(prepared: fx.GraphModule, calibration_data, config: JLSSConfig = JLSSConfig(), progress: bool = True,
         ) -> JLSSReport:
    """Learn smoothing scales and step sizes of a calibrated prepared model, block by block (in place).

    Args:
        prepared: ``prepare_pt2e(gm, VisualMambaQuantizer(recipes.ptq4vm(...)))`` after :func:`vmq_fx.calibrate`.
        calibration_data: the calibration images (tensor [N, C, H, W] or iterable of batches).
        config: hyper-parameters (PTQ4VM's defaults per model family).
        progress: one progress bar per block.

    Returns:
        A :class:`JLSSReport` with the per-block loss before and after, and the wall time.

    Example:
        >>> report = vmq_fx.jlss(prepared, calibration_images)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        JLSS: 8 blocks in 95.1 s; mean block loss (1 - cos) 0.0123 -> 0.0041
    """
    t0 = time.perf_counter()
    recipe = prepared.meta.get("vmq_recipe")
    quantizers = linear_quantizers(prepared)
    all_q = [m for _, a, w in quantizers.values() for m in (a, w)]
    if not all(isinstance(q, (PerTokenStaticFakeQuantize, PerChannelWeightFakeQuantize)) for q in all_q):
        raise ValueError("jlss needs the per-token static recipe (recipes.ptq4vm); per-tensor baselines have no "
                         "learnable step sizes")
    if not all(q.initialized for q in all_q):
        raise ValueError("jlss: the prepared model is not calibrated; run vmq_fx.calibrate(prepared, data) first")
    family = next(iter(quantizers.values()))[0].family
    cfg = config.resolved(family, bool(recipe and recipe.learn_all_projections))
    images = torch.cat(split_batches(calibration_data, 256))
    runner = BlockRunner(prepared, images)
    gen = torch.Generator().manual_seed(cfg.seed)
    before, after = [], []
    for k, block in enumerate(runner.blocks):
        _, fp_out = runner.capture(k, fake_quant=False)
        q_in, _ = runner.capture(k, fake_quant=True)
        groups: dict[str, list[nn.Parameter]] = {"weight": [], "act": [], "smooth": []}
        for layer, act, weight in runner.layers(k):
            if layer.role in ("x_proj", "dt_proj") and not cfg.learn_all_projections:
                continue
            groups["act"].append(act.scale)
            groups["weight"].append(weight.scale)
            if layer.smooth_attr:
                groups["smooth"].append(prepared.get_parameter(layer.smooth_attr))
        params = [p for ps in groups.values() for p in ps]
        lrs = {"weight": cfg.lr_weight, "act": cfg.lr_act, "smooth": cfg.lr_smooth}
        opt = torch.optim.AdamW([{"params": ps, "lr": lrs[g]} for g, ps in groups.items() if ps],
                                weight_decay=cfg.weight_decay)
        n = len(images)
        with torch.no_grad():
            before.append(runner.loss(k, q_in, fp_out).item())
        frozen = runner.frozen_except(params)
        try:
            bar = tqdm(range(cfg.steps), desc=f"JLSS {block}", disable=not progress, leave=False)
            for _ in bar:
                idx = None if cfg.batch_size is None or cfg.batch_size >= n else torch.randperm(
                    n, generator=gen)[: cfg.batch_size]
                loss = runner.loss(k, q_in, fp_out, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                with torch.no_grad():
                    for p in params:
                        p.clamp_(min=1e-8)
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        with torch.no_grad():
            after.append(runner.loss(k, q_in, fp_out).item())
    report = JLSSReport(len(runner.blocks), before, after, time.perf_counter() - t0)
    if progress:
        print(report)
    return report
