"""JLSS: Joint Learning of Smoothing scales and Step sizes (PTQ4VM), block by block.

For each block in order, with the weights frozen:

* target: the floating-point block's output on floating-point inputs;
* input: the output of the already-quantized blocks before it (fake quantization on);
* loss: mean over tokens of ``1 - cos`` between the target and the fake-quantized block output along channels;
* learned: the block's weight step sizes (per output channel), activation step sizes (per token) and smoothing
  scales (per input channel), with AdamW (weight decay 1e-5), gradient-norm clip 2.0 and no schedule.

The prepared graph is split into one submodule per block (module paths from ``nn_module_stack``) with
``torch.fx.passes.split_module``; the submodules share the quantizer modules and parameters of the prepared model,
so learning updates the prepared model in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.split_module import split_module
from tqdm.auto import tqdm

from vmq_fx.calibrate import _batches, linear_quantizers
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


class _Stop(Exception):
    pass


def _block_index_of(paths: list[str], blocks: list[str]) -> int | None:
    for path in reversed(paths):
        if path in blocks:
            return blocks.index(path)
    return None


def _split_by_block(gm: fx.GraphModule, blocks: list[str]) -> fx.GraphModule:
    """Partitions: 0 (before the first block), 2k+1 (block k), 2k+2 (between block k and k+1, and after the last)."""
    part: dict[fx.Node, int] = {}
    current = 0
    pending: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        k = _block_index_of(paths, blocks)
        if k is not None:
            current = 2 * k + 1
            part[node] = current
        else:
            pending.append(node)
    # Nodes without a block (observers prepare inserted, constants, glue between blocks) go with their earliest
    # user when that is in a block, else with the glue partition after the block that precedes them.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in reversed(pending):
        users = [part[u] for u in node.users if u in part]
        if users:
            part[node] = min(users)
        else:
            before = [part[n] for n in part if order[n] < order[node]]
            prev = max(before) if before else 0
            part[node] = prev + 1 if prev % 2 == 1 else prev
    return split_module(gm, gm, lambda n: part[n], keep_original_order=True)


def _block_paths(gm: fx.GraphModule) -> list[str]:
    layers = linear_quantizers(gm)
    seen: list[str] = []
    for layer, _, _ in layers.values():
        if layer.block not in seen:
            seen.append(layer.block)
    return seen


def _loss(fp: list[Tensor], q: list[Tensor]) -> Tensor:
    terms = [(1 - F.cosine_similarity(a, b, dim=-1)).mean() for a, b in zip(fp, q)]
    return torch.stack(terms).mean()


def _set_fake_quant(quantizers, enabled: bool) -> None:
    for q in quantizers:
        q.enable_fake_quant(enabled)


def _float_outputs(out) -> list[Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in outs if isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 3]


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
    images = torch.cat(_batches(calibration_data, 256))
    blocks = _block_paths(prepared)
    split = _split_by_block(prepared, blocks)
    submods = {int(name[len("submod_"):]): mod for name, mod in split.named_children() if name.startswith("submod_")}

    def capture(k: int, fake_quant: bool) -> tuple[tuple, list[Tensor]]:
        """Inputs and float outputs of block k on all images, with fake quantization on or off."""
        _set_fake_quant(all_q, fake_quant)
        mod = submods[2 * k + 1]
        ins, outs = [], []

        def pre(_, args):
            ins.append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args))

        def post(_, __, out):
            outs.append([t.detach() for t in _float_outputs(out)])
            raise _Stop

        hooks = [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        try:
            with torch.no_grad():
                for x in images.split(64):
                    try:
                        split(x)
                    except _Stop:
                        pass
        finally:
            for h in hooks:
                h.remove()
            _set_fake_quant(all_q, True)
        cat_in = tuple(torch.cat([b[i] for b in ins]) if isinstance(ins[0][i], Tensor) else ins[0][i]
                       for i in range(len(ins[0])))
        cat_out = [torch.cat([b[i] for b in outs]) for i in range(len(outs[0]))]
        return cat_in, cat_out

    gen = torch.Generator().manual_seed(cfg.seed)
    before, after = [], []
    for k, block in enumerate(blocks):
        fp_in, fp_out = capture(k, fake_quant=False)
        q_in, _ = capture(k, fake_quant=True)
        mod = submods[2 * k + 1]
        groups: dict[str, list[nn.Parameter]] = {"weight": [], "act": [], "smooth": []}
        for layer, act, weight in quantizers.values():
            if layer.block != block:
                continue
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

        def block_loss(idx=None) -> Tensor:
            args = tuple(a[idx] if isinstance(a, Tensor) and idx is not None else a for a in q_in)
            target = [t[idx] if idx is not None else t for t in fp_out]
            return _loss(target, _float_outputs(mod(*args)))

        with torch.no_grad():
            before.append(block_loss().item())
        frozen = [p for p in prepared.parameters() if p.requires_grad and all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            bar = tqdm(range(cfg.steps), desc=f"JLSS {block}", disable=not progress, leave=False)
            for _ in bar:
                idx = None if cfg.batch_size is None or cfg.batch_size >= n else torch.randperm(
                    n, generator=gen)[: cfg.batch_size]
                loss = block_loss(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                with torch.no_grad():
                    for p in groups["act"] + groups["weight"] + groups["smooth"]:
                        p.clamp_(min=1e-8)
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        with torch.no_grad():
            after.append(block_loss().item())
        del fp_in
    report = JLSSReport(len(blocks), before, after, time.perf_counter() - t0)
    if progress:
        print(report)
    return report
