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

import operator
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.split_module import split_module
from tqdm.auto import tqdm

from vmq_fx.calibrate import linear_quantizers, split_batches
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


_BATCH = object()  # stands for "the batch size" among a block's captured arguments


def _block_index_of(paths: list[str], blocks: list[str]) -> int | None:
    for path in reversed(paths):
        if path in blocks:
            return blocks.index(path)
    return None


def _split_by_block(gm: fx.GraphModule, blocks: list[str]) -> fx.GraphModule:
    """Partitions: 0 (before the first block), 2k+1 (block k), 2k+2 (between block k and k+1, and after the last)."""
    part: dict[fx.Node, int] = {}
    deferred: list[fx.Node] = []
    last = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op in ("get_attr", "call_module"):
            # Constants and the observers prepare_pt2e inserted carry no module path: they go with their users.
            deferred.append(node)
            continue
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        k = _block_index_of(paths, blocks)
        if k is not None:
            part[node] = 2 * k + 1
        else:  # computation outside the blocks: the glue partition after the block that precedes it
            part[node] = last + 1 if last % 2 == 1 else last
        last = max(last, part[node])
    for node in reversed(deferred):
        users = [part[u] for u in node.users if u in part]
        part[node] = min(users) if users else last
    return split_module(gm, gm, lambda n: part[n])


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


def _block_loss(split: fx.GraphModule, mod: nn.Module, spec, q_in: list, fp_out: list[Tensor], idx) -> Tensor:
    """Loss of one block on the cached quantized-path inputs (all, or the mini-batch ``idx``) against the FP outputs.
    Parameters are read from ``split`` at call time so that gradients reach the prepared model's own."""
    batch = len(_first_tensor(q_in)) if idx is None else len(idx)

    def data(v):
        if v is _BATCH:
            return batch
        return v if idx is None or not isinstance(v, Tensor) else v[idx]

    args = [operator.attrgetter(ref)(split) if kind == "attr" else data(q_in[ref]) for kind, ref in spec]
    target = [t if idx is None else t[idx] for t in fp_out]
    return _loss(target, _float_outputs(mod(*args)))


def _first_tensor(q_in: list) -> Tensor:
    return next(v for v in q_in if isinstance(v, Tensor))


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
    images = torch.cat(split_batches(calibration_data, 256))
    blocks = _block_paths(prepared)
    split = _split_by_block(prepared, blocks)
    submods = {int(name[len("submod_"):]): mod for name, mod in split.named_children() if name.startswith("submod_")}

    def call_spec(k: int) -> list[tuple[str, object]]:
        """How block k's submodule is called: ("attr", name) for a constant or parameter of the prepared model (passed
        live, so learning reaches it), ("data", index) for an activation computed by earlier partitions."""
        call = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == f"submod_{2 * k + 1}")
        spec, data = [], 0
        for a in call.args:
            if isinstance(a, fx.Node) and a.op == "get_attr":
                spec.append(("attr", str(a.target)))
            else:
                spec.append(("data", data))
                data += 1
        return spec

    def capture(k: int, spec, fake_quant: bool) -> tuple[list[Tensor], list[Tensor]]:
        """Block k's activation inputs and float outputs on all images, with fake quantization on or off."""
        _set_fake_quant(all_q, fake_quant)
        mod = submods[2 * k + 1]
        data_pos = [i for i, (kind, _) in enumerate(spec) if kind == "data"]
        ins, outs = [], []

        def pre(_, args):
            batch = next(a.shape[0] for a in args if isinstance(a, Tensor))
            # A symbolic size passed between partitions can only be the batch (the one dynamic dimension).
            ins.append([args[i].detach() if isinstance(args[i], Tensor) else
                        (_BATCH if args[i] == batch else args[i]) for i in data_pos])

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
        return ([torch.cat([b[i] for b in ins]) if isinstance(ins[0][i], Tensor) else ins[0][i]
                 for i in range(len(data_pos))],
                [torch.cat([b[i] for b in outs]) for i in range(len(outs[0]))])

    gen = torch.Generator().manual_seed(cfg.seed)
    before, after = [], []
    for k, block in enumerate(blocks):
        spec = call_spec(k)
        _, fp_out = capture(k, spec, fake_quant=False)
        q_in, _ = capture(k, spec, fake_quant=True)
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

        def block_loss(idx=None, mod=mod, spec=spec, q_in=q_in, fp_out=fp_out) -> Tensor:
            return _block_loss(split, mod, spec, q_in, fp_out, idx)

        with torch.no_grad():
            before.append(block_loss().item())
        learned = {id(p) for p in params}
        frozen = [p for p in prepared.parameters() if p.requires_grad and id(p) not in learned]
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
                    for p in params:
                        p.clamp_(min=1e-8)
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        with torch.no_grad():
            after.append(block_loss().item())
    report = JLSSReport(len(blocks), before, after, time.perf_counter() - t0)
    if progress:
        print(report)
    return report
