"""JLSS: Joint Learning of Smoothing scales and Step sizes (PTQ4VM), block by block.

For each block in order, with the weights frozen:

* target: the floating-point block's output on floating-point inputs;
* input: the output of the already-quantized blocks before it (fake quantization on);
* loss: mean over tokens of ``1 - cos`` between the target and the fake-quantized block output along channels (the
  residual stream after the block by default, or the mixer's output as PTQ4VM's authors:
  ``PTQ4VMRecipe.jlss_target``);
* learned: the block's weight step sizes (per output channel), activation step sizes (per token) and smoothing
  scales (per input channel), with AdamW (weight decay 1e-5), gradient-norm clip 2.0 and no schedule, on the values
  themselves (PTQ4VM) or on their logarithms (``PTQ4VMRecipe.step_domain``).

The block-by-block machinery (graph split, input capture, loss) is :class:`vmq_fx.pt2e.blockwise.BlockRunner`; learning
updates the prepared model in place.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from vmq_fx.pt2e.blockwise import BlockRunner
from vmq_fx.pt2e.utils import linear_quantizers, split_batches
from vmq_fx.pt2e.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize
from vmq_fx.pt2e.recipes import Schedule

__all__ = ["JLSSReport", "jlss", "resolved_schedule"]

log = logging.getLogger(__name__)


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


def resolved_schedule(schedule: Schedule, family: str, optimizer: str) -> tuple[int, int | None, int]:
    """(steps, batch_size, seed) of a block-wise optimization: the schedule's, else the method's defaults (JLSS:
    Vim 100 steps, VMamba 400, on all images, as PTQ4VM; ViM-VQ: 100 steps of 64 images)."""
    if optimizer == "jlss":
        steps, batch = (100 if family == "vim" else 400), None
    else:
        steps, batch = 100, 64
    return (steps if schedule.steps is None else schedule.steps,
            batch if schedule.batch_size is None else schedule.batch_size, schedule.seed)


class _LogDomain:
    """Adam on ``u = log(p)`` for positive parameters ``p`` that the model reads directly: after backward ``u``'s
    gradient is ``p * dL/dp`` (the chain rule), after each step ``p`` is set to ``exp(u)``."""

    def __init__(self, param_groups: list[dict]):
        self.pairs = [(p, nn.Parameter(p.detach().clamp(min=1e-8).log())) for g in param_groups for p in g["params"]]
        logs = {id(p): u for p, u in self.pairs}
        self.groups = [{**g, "params": [logs[id(p)] for p in g["params"]]} for g in param_groups]

    @torch.no_grad()
    def write(self) -> None:
        for p, u in self.pairs:
            p.copy_(u.exp())

    @torch.no_grad()
    def pull_grads(self) -> None:
        for p, u in self.pairs:
            u.grad = None if p.grad is None else p.grad * p


def _learned(layer, act, weight) -> dict[str, list[nn.Parameter]]:
    """The JLSS parameters of one linear, by learning-rate group."""
    if layer.role in ("x_proj", "dt_proj") and not layer.recipe.learn_all_projections:
        return {}
    groups = {"act": [act.scale], "weight": [weight.scale]}
    if act.smooth is not None:
        groups["smooth"] = [act.smooth]
    return groups


def jlss(prepared: fx.GraphModule, calibration_data, schedule: Schedule | None = None, progress: bool = True,
         ) -> JLSSReport:
    """Learn smoothing scales and step sizes of a calibrated prepared model, block by block (in place).

    Each linear learns with its recipe's learning rates (:meth:`vmq_fx.pt2e.recipes.PTQ4VMRecipe.learning_rates`).

    Args:
        prepared: ``prepare_pt2e(gm, VisualMambaQuantizer(recipes.ptq4vm(...)))`` after :func:`vmq_fx.calibrate`.
        calibration_data: the calibration images (tensor [N, C, H, W] or iterable of batches).
        schedule: steps per block, images per step, seed (default: the global recipe's schedule, whose unset
            fields take PTQ4VM's: 100 steps on Vim, 400 on VMamba, all images per step).
        progress: one progress bar per block.

    Returns:
        A :class:`JLSSReport` with the per-block loss before and after, and the wall time.

    Example:
        >>> import torch, vmq_fx
        >>> model = vmq_fx.models.create_model("vim_fm_tiny", depth=2).eval()
        >>> gm = vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()
        >>> prepared = vmq_fx.prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.pt2e.recipes.ptq4vm(4, 4)))
        >>> calibration_images = torch.randn(16, 1, 28, 28)
        >>> vmq_fx.calibrate(prepared, calibration_images, progress=False)
        >>> report = vmq_fx.jlss(prepared, calibration_images, vmq_fx.Schedule(steps=10), progress=False)
        >>> report.blocks, len(report.loss_after)
        (2, 2)
    """
    t0 = time.perf_counter()
    quantizers = linear_quantizers(prepared)
    all_q = [m for _, a, w in quantizers.values() for m in (a, w)]
    if not all(isinstance(q, (PerTokenStaticFakeQuantize, PerChannelWeightFakeQuantize)) for q in all_q):
        raise ValueError("jlss needs per-token static recipes (recipes.ptq4vm); per-tensor, per-token dynamic and VQ "
                         "quantizers have no step sizes it learns")
    if not all(q.initialized for q in all_q):
        raise ValueError("jlss: the prepared model is not calibrated; run vmq_fx.calibrate(prepared, data) first")
    first = next(iter(quantizers.values()))[0]
    family = first.family
    settings = prepared.meta.get("vmq_quantizer")
    recipe = settings.global_recipe if settings is not None and settings.global_recipe is not None else first.recipe
    steps, batch_size, seed = resolved_schedule(schedule or recipe.schedule, family, "jlss")
    images = torch.cat(split_batches(calibration_data, 256))
    runner = BlockRunner(prepared, images)
    gen = torch.Generator().manual_seed(seed)
    before, after = [], []
    for k, block in enumerate(runner.blocks):
        _, fp_out = runner.capture(k, fake_quant=False)
        q_in, q_out = runner.capture(k, fake_quant=True)
        param_groups = []
        for layer, act, weight in runner.layers(k):
            lrs = layer.recipe.learning_rates(family)
            for kind, ps in _learned(layer, act, weight).items():
                param_groups.append({"params": ps, "lr": lrs[kind], "weight_decay": layer.recipe.weight_decay})
        params = [p for g in param_groups for p in g["params"]]
        n = len(images)
        with torch.no_grad():
            before.append(runner.loss_of_outputs(k, fp_out, q_out, recipe.jlss_target).item())
        del q_out
        if params and steps:
            log_domain = _LogDomain(param_groups) if recipe.step_domain == "log" else None
            groups = param_groups if log_domain is None else log_domain.groups
            opt = torch.optim.AdamW(groups)
            stepped = [p for g in groups for p in g["params"]]
            frozen = runner.frozen_except(params)
            try:
                bar = tqdm(range(steps), desc=f"JLSS {block}", disable=not progress, leave=False)
                for _ in bar:
                    idx = None if batch_size is None or batch_size >= n else torch.randperm(
                        n, generator=gen)[:batch_size]
                    loss = runner.loss(k, q_in, fp_out, idx, recipe.jlss_target)
                    opt.zero_grad(set_to_none=True)
                    if log_domain is not None:  # the optimizer holds the logarithms, not these
                        for p in params:
                            p.grad = None
                    loss.backward()
                    if log_domain is not None:
                        log_domain.pull_grads()
                    torch.nn.utils.clip_grad_norm_(stepped, recipe.grad_clip)
                    opt.step()
                    with torch.no_grad():
                        if log_domain is not None:
                            log_domain.write()
                        for p in params:
                            p.clamp_(min=1e-8)
                    bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            with torch.no_grad():
                after.append(runner.loss(k, q_in, fp_out, target=recipe.jlss_target).item())
        else:  # nothing learned: the loss is the one before
            after.append(before[-1])
    report = JLSSReport(len(runner.blocks), before, after, time.perf_counter() - t0)
    log.info("%s", report)
    return report
