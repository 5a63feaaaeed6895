"""JLSS: Joint Learning of Smoothing scales and Step sizes (PTQ4VM), block by block.

For each block in order, with the weights frozen:

* target: the floating-point block's output on floating-point inputs;
* input: the output of the already-quantized blocks before it (fake quantization on);
* loss: mean over tokens of ``1 - cos`` between the target and the fake-quantized block output along channels (the
  residual stream after the block by default, or the mixer's output as PTQ4VM's authors: ``JLSSConfig.target``);
* learned: the weight step sizes (per output channel), activation step sizes (per token) and smoothing scales (per
  input channel) of the block's linears whose recipe has ``jlss=True``, with AdamW (weight decay 1e-5),
  gradient-norm clip 2.0 and no schedule, on the values themselves (PTQ4VM) or on their logarithms
  (``JLSSConfig.step_domain``).

The per-block loop is :func:`vmq_fx.pt2e.blockwise.optimize_blocks`; learning updates the prepared model in place.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from vmq_fx.pt2e.blockwise import BlockMethod, BlockRunner, LossTarget, optimize_blocks
from vmq_fx.pt2e.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize
from vmq_fx.pt2e.utils import linear_quantizers

__all__ = ["JLSSConfig", "JLSSReport", "jlss"]

log = logging.getLogger(__name__)

StepDomain = Literal["linear", "log"]


@dataclass(frozen=True)
class JLSSConfig:
    """How :func:`jlss` runs (the run-level settings; which layers learn is their recipe's ``jlss``).

    Args:
        steps: optimization steps per block (``None``: PTQ4VM's, 100 on Vim and 400 on VMamba).
        batch_size: calibration images per step (``None``: all of them, PTQ4VM's one batch).
        seed: seed of the mini-batch sampling.
        lr_weight, lr_act, lr_smooth: learning rates of the weight step sizes, activation step sizes and smoothing
            scales (``None``: PTQ4VM's, Vim 5e-4 / 5e-4 / 1e-2, VMamba 1e-4 for all three; with
            ``step_domain="log"`` 1e-3 for all three).
        target: what the ``1 - cos`` loss compares: ``"stream"`` (the default: the residual stream after the block,
            what the next block reads) or ``"mixer"`` (the authors' PTQ4VM: the mixer's output; VMamba blocks add
            their residual inside). With 3 calibration seeds the stream target scored +0.22 points over the mixer's on
            vim-fm-tiny at W4A4 and was within noise of it elsewhere (``bench/results/ptq4vm_accuracy.md``).
        step_domain: ``"linear"`` (PTQ4VM: Adam on the step sizes and smoothing scales themselves) or ``"log"``
            (Adam on their logarithms: an update is a relative change, the same for a step of 0.002 and of 0.2).
        weight_decay, grad_clip: AdamW's weight decay and the gradient-norm clip.
        learn_all_projections: also learn the x_proj / dt_proj parameters (the authors' code leaves them at init).
    """

    steps: int | None = None
    batch_size: int | None = None
    seed: int = 0
    lr_weight: float | None = None
    lr_act: float | None = None
    lr_smooth: float | None = None
    target: LossTarget = "stream"
    step_domain: StepDomain = "linear"
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    learn_all_projections: bool = False

    def __post_init__(self):
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"JLSSConfig: steps must be a non-negative integer, got {self.steps!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"JLSSConfig: batch_size must be a positive integer, got {self.batch_size!r}")
        if self.target not in ("mixer", "stream"):
            raise ValueError(f"JLSSConfig: target must be 'mixer' or 'stream', got {self.target!r}")
        if self.step_domain not in ("linear", "log"):
            raise ValueError(f"JLSSConfig: step_domain must be 'linear' or 'log', got {self.step_domain!r}")
        for name in ("lr_weight", "lr_act", "lr_smooth"):
            lr = getattr(self, name)
            if lr is not None and lr < 0:
                raise ValueError(f"JLSSConfig: {name} must be >= 0, got {lr}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("JLSSConfig: grad_clip must be positive and weight_decay >= 0")

    def steps_for(self, family: str) -> int:
        """Steps per block on a model of ``family`` (``"vim"`` / ``"vmamba"``)."""
        return (100 if family == "vim" else 400) if self.steps is None else self.steps

    def learning_rates(self, family: str) -> dict[str, float]:
        """The learning rates for ``"weight"``, ``"act"`` and ``"smooth"`` (PTQ4VM's per family by default)."""
        vim = family == "vim"
        if self.step_domain == "log":
            defaults = {"weight": 1e-3, "act": 1e-3, "smooth": 1e-3}
        else:
            defaults = {"weight": 5e-4 if vim else 1e-4, "act": 5e-4 if vim else 1e-4,
                        "smooth": 1e-2 if vim else 1e-4}
        given = {"weight": self.lr_weight, "act": self.lr_act, "smooth": self.lr_smooth}
        return {k: defaults[k] if given[k] is None else given[k] for k in defaults}


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


def _learned(layer, act, weight, config: JLSSConfig) -> dict[str, list[nn.Parameter]]:
    """The JLSS parameters of one linear, by learning-rate group."""
    if not layer.recipe.optimizes or (layer.role in ("x_proj", "dt_proj") and not config.learn_all_projections):
        return {}
    groups = {"act": [act.scale] + ([act.outliers.scale] if act.outliers is not None else []),
              "weight": [weight.scale]}
    if act.smooth is not None:
        groups["smooth"] = [act.smooth]
    return groups


class _JLSS(BlockMethod):
    """JLSS in the shared per-block loop: AdamW on the block's step sizes and smoothing scales."""

    def __init__(self, config: JLSSConfig, family: str):
        self.config, self.family, self.target = config, family, config.target
        self.params: list[nn.Parameter] = []
        self.stepped: list[torch.Tensor] = []
        self.log_domain: _LogDomain | None = None

    def begin(self, runner: BlockRunner, k: int):
        lrs = self.config.learning_rates(self.family)
        groups = [{"params": ps, "lr": lrs[kind], "weight_decay": self.config.weight_decay}
                  for layer, act, weight in runner.layers(k)
                  for kind, ps in _learned(layer, act, weight, self.config).items()]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            return None
        self.log_domain = _LogDomain(groups) if self.config.step_domain == "log" else None
        if self.log_domain is not None:  # the optimizer holds the logarithms, not the parameters
            groups = self.log_domain.groups
        self.stepped = [p for g in groups for p in g["params"]]
        return self.params, torch.optim.AdamW(groups)

    def after_backward(self) -> None:
        if self.log_domain is not None:
            self.log_domain.pull_grads()
        torch.nn.utils.clip_grad_norm_(self.stepped, self.config.grad_clip)

    @torch.no_grad()
    def after_step(self, step: int, steps: int, optimizer) -> None:
        if self.log_domain is not None:
            self.log_domain.write()
        for p in self.params:
            p.clamp_(min=1e-8)


def jlss(prepared: fx.GraphModule, calibration_data, config: JLSSConfig | None = None, progress: bool = True,
         ) -> JLSSReport:
    """Learn smoothing scales and step sizes of a calibrated prepared model, block by block (in place).

    Args:
        prepared: ``prepare_pt2e(gm, VisualMambaQuantizer(recipes.ptq4vm(...)))`` after :func:`vmq_fx.calibrate`;
            the linears whose recipe has ``jlss=True`` learn.
        calibration_data: the calibration images (tensor [N, C, H, W], map-style dataset of images, or iterable of
            batches; see :mod:`vmq_fx.pt2e.utils`).
        config: steps, images per step, seed, learning rates, loss target (default :class:`JLSSConfig()`: PTQ4VM's
            100 steps on Vim, 400 on VMamba, all images per step).
        progress: one progress bar per block.

    Returns:
        A :class:`JLSSReport` with the per-block loss before and after, and the wall time.

    Example:
        >>> import torch, vmq_fx
        >>> model = vmq_fx.models.create_model("vim_fm_tiny", depth=2).eval()
        >>> gm = vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()
        >>> prepared = vmq_fx.prepare_pt2e(gm, vmq_fx.VisualMambaQuantizer(vmq_fx.recipes.ptq4vm(4, 4)))
        >>> calibration_images = torch.randn(16, 1, 28, 28)
        >>> vmq_fx.calibrate(prepared, calibration_images, progress=False)
        >>> report = vmq_fx.jlss(prepared, calibration_images, vmq_fx.JLSSConfig(steps=10), progress=False)
        >>> report.blocks, len(report.loss_after)
        (2, 2)
    """
    config = JLSSConfig() if config is None else config
    if not isinstance(config, JLSSConfig):
        raise TypeError(f"jlss: config must be a JLSSConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    quantizers = linear_quantizers(prepared)
    all_q = [m for _, a, w in quantizers.values() for m in (a, w)]
    if not all(isinstance(q, (PerTokenStaticFakeQuantize, PerChannelWeightFakeQuantize)) for q in all_q):
        raise ValueError("jlss needs per-token static recipes (recipes.ptq4vm); per-tensor, per-token dynamic and VQ "
                         "quantizers have no step sizes it learns")
    if not all(q.initialized for q in all_q):
        raise ValueError("jlss: the prepared model is not calibrated; run vmq_fx.calibrate(prepared, data) first")
    if not any(layer.recipe.optimizes for layer, _, _ in quantizers.values()):
        raise ValueError("jlss: no linear of this model has a recipe with JLSS (jlss=True, recipes.ptq4vm); "
                         "calibration-only recipes (sq-pts, pts) learn nothing")
    family = next(iter(quantizers.values()))[0].family
    runner = BlockRunner(prepared, calibration_data)
    losses = optimize_blocks(runner, _JLSS(config, family), config.steps_for(family), config.batch_size, config.seed,
                             "JLSS", progress)
    report = JLSSReport(len(runner.blocks), losses.before, losses.after, time.perf_counter() - t0)
    log.info("%s", report)
    return report
