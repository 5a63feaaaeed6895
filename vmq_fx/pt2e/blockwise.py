"""Block-by-block reconstruction on a prepared graph, shared by JLSS and ViM-VQ.

The prepared graph is split into one submodule per block (module paths from ``nn_module_stack``) with
``torch.fx.passes.split_module``; the submodules share the quantizer modules and parameters of the prepared model,
so learning updates the prepared model in place. For block ``k``:

* :meth:`BlockRunner.capture` runs the images up to block ``k`` (on from block ``k - 1``'s inputs, which the previous
  call kept) and records its inputs and float outputs, with fake quantization on (inputs from the already-quantized
  preceding blocks) or off (the floating-point target);
* :meth:`BlockRunner.loss` is the mean over tokens of ``1 - cos`` between the target and the block's output on the
  captured inputs (all of them or a mini-batch), with the live parameters of the prepared model. The block's output
  is its mixer's (``"mixer"``, PTQ4VM's loss; a VMamba block adds its residual inside, so there it is the block's
  output) or the residual stream after the block (``"stream"``: Vim's residual plus the mixer output, what the next
  block reads).

:func:`optimize_blocks` is the per-block training loop both methods run; a :class:`BlockMethod` says what each
method learns and does around the steps.

Under ``torchrun`` each process captures and holds only its share of the images (a contiguous run,
:func:`vmq_fx.distributed.batch_shard`; from a map-style dataset it reads only those), so the captures' memory per
process falls as 1 / N. Every process draws the same mini-batch of the whole set, computes the loss of the part it
holds (weighted by that part's share of the mini-batch), and the gradients are summed over the processes before the
optimizer's step: the step of one process on the whole mini-batch, up to float rounding, with the same parameters
everywhere.
"""
from __future__ import annotations

import abc
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.split_module import split_module

from tqdm.auto import tqdm

from vmq_fx import distributed
from vmq_fx.pt2e.utils import is_image_dataset, linear_quantizers, read_images, set_fake_quant, split_batches

__all__ = ["BlockLosses", "BlockMethod", "BlockRunner", "LossTarget", "optimize_blocks"]

LossTarget = Literal["mixer", "stream"]

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


def _loss(fp: list[Tensor], q: list[Tensor]) -> Tensor:
    terms = [(1 - F.cosine_similarity(a, b, dim=-1)).mean() for a, b in zip(fp, q)]
    return torch.stack(terms).mean()


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _is_activation(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 3


def _own_outputs(submod: fx.GraphModule, spec: list[tuple[str, object]]) -> list[bool]:
    """For each output of a block's submodule: whether it depends on the block's own parameters or quantizers (the
    mixer's output) rather than on its data inputs alone (Vim's residual stream, which a block passes on)."""
    placeholders = [n for n in submod.graph.nodes if n.op == "placeholder"]
    own = {p for p, (kind, _) in zip(placeholders, spec) if kind == "attr"}
    outputs = _as_tuple(next(n for n in submod.graph.nodes if n.op == "output").args[0])

    def depends(node) -> bool:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n in own or n.op in ("get_attr", "call_module"):
                return True
            stack.extend(n.all_input_nodes)
        return False

    return [depends(o) for o in outputs]


class _Walk:
    """The split model's top-level graph executed node by node on chunks of images, resumable: ``advance_to(i)``
    executes the nodes before index ``i`` (from where the last call stopped) and yields, per chunk, the arguments of
    node ``i`` without executing it. Values no later node reads are dropped."""

    def __init__(self, split: fx.GraphModule, chunks):
        self.split = split
        self.nodes = list(split.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
        (placeholder,) = [n for n in self.nodes if n.op == "placeholder"]  # the images
        self.envs = [{placeholder: chunk} for chunk in chunks]
        self.position = 0

    def _run(self, node: fx.Node, env: dict):
        if node.op == "placeholder":
            return env[node]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node.op == "call_module":
            return self.split.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.split)
        raise RuntimeError(f"blockwise: unexpected {node.op} node {node.name} before the last block")

    def advance_to(self, i: int):
        for env in self.envs:
            for node in self.nodes[self.position:i]:
                env[node] = self._run(node, env)
            for node in [n for n in env if self.last_use[n] < i]:
                del env[node]
            yield fx.node.map_arg(self.nodes[i].args, lambda n: env[n])
        self.position = i


class BlockRunner:
    """Runs a calibrated prepared model block by block.

    Args:
        prepared: a model prepared with :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer` and calibrated.
        calibration_data: the calibration images (tensor ``[N, C, H, W]``, map-style dataset of images, or iterable
            of batches: see :mod:`vmq_fx.pt2e.utils`); under ``torchrun`` the runner keeps this process's share
            (``self.images``, items ``self.share`` of the ``self.total``).
    """

    def __init__(self, prepared: fx.GraphModule, calibration_data):
        dataset = is_image_dataset(calibration_data)
        whole = calibration_data if isinstance(calibration_data, Tensor) or dataset else torch.cat(
            split_batches(calibration_data, 256))
        if len(whole) == 0:
            raise ValueError("calibration data is empty: pass calibration images")
        if len(whole) < distributed.world_size():
            raise ValueError(f"{len(whole)} calibration images for {distributed.world_size()} processes: every "
                             "process needs one")
        self.prepared = prepared
        self.total = len(whole)
        self.share = distributed.batch_shard(len(whole), 1)
        if dataset:  # only this process's images are read
            self.images = read_images(whole, self.share)
        else:
            mine = whole[self.share.start:self.share.stop]
            # The caller's tensor is viewed, not copied; a concatenation made here keeps only this process's part.
            self.images = mine if whole is calibration_data or len(mine) == len(whole) else mine.clone()
        self.quantizers = linear_quantizers(prepared)
        self.blocks: list[str] = []
        for layer, _, _ in self.quantizers.values():
            if layer.block not in self.blocks:
                self.blocks.append(layer.block)
        self.split = _split_by_block(prepared, self.blocks)
        self._submods = {int(name[len("submod_"):]): mod for name, mod in self.split.named_children()
                         if name.startswith("submod_")}
        self._specs = [self._spec(k) for k in range(len(self.blocks))]
        self._own = [_own_outputs(self._submods[2 * k + 1], self._specs[k]) for k in range(len(self.blocks))]
        nodes = list(self.split.graph.nodes)
        calls = {n.target: i for i, n in enumerate(nodes) if n.op == "call_module"}
        self._calls = [calls[f"submod_{2 * k + 1}"] for k in range(len(self.blocks))]
        self._walks: dict[bool, _Walk] = {}

    def layers(self, k: int):
        """(layer, activation quantizer, weight quantizer) of the linears of block ``k``."""
        return [entry for entry in self.quantizers.values() if entry[0].block == self.blocks[k]]

    def _spec(self, k: int) -> list[tuple[str, object]]:
        """How block k's submodule is called: ("attr", name) for a constant or parameter of the prepared model (passed
        live, so learning reaches it), ("data", index) for an activation computed by earlier partitions."""
        call = next(n for n in self.split.graph.nodes if n.op == "call_module" and n.target == f"submod_{2 * k + 1}")
        spec, data = [], 0
        for a in call.args:
            if isinstance(a, fx.Node) and a.op == "get_attr":
                spec.append(("attr", str(a.target)))
            else:
                spec.append(("data", data))
                data += 1
        return spec

    def capture(self, k: int, fake_quant: bool) -> tuple[list, list[Tensor]]:
        """Block k's activation inputs and float outputs on all images, with fake quantization on or off.

        Calls come block by block (k = 0, 1, ... for each mode): the split graph is walked on from where the previous
        call of the same mode stopped, re-running block k-1 with its final parameters, so that the cost per block
        does not grow with k. Calling an earlier block again walks from the images.
        """
        set_fake_quant(self.quantizers, fake_quant)
        call = self._calls[k]
        walk = self._walks.get(fake_quant)
        if walk is None or walk.position > call:
            walk = self._walks[fake_quant] = _Walk(self.split, self.images.split(64))
        spec = self._specs[k]
        data_pos = [i for i, (kind, _) in enumerate(spec) if kind == "data"]
        ins, outs = [], []
        try:
            with torch.no_grad():
                for args in walk.advance_to(call):
                    batch = next(args[i].shape[0] for i in data_pos if isinstance(args[i], Tensor))
                    # A symbolic size passed between partitions can only be the batch (the one dynamic dimension).
                    ins.append([args[i].detach() if isinstance(args[i], Tensor) else
                                (_BATCH if args[i] == batch else args[i]) for i in data_pos])
                    out = self._submods[2 * k + 1](*args)
                    outs.append([t.detach() if _is_activation(t) else None for t in _as_tuple(out)])
        finally:
            set_fake_quant(self.quantizers, True)
        return ([torch.cat([b[i] for b in ins]) if isinstance(ins[0][i], Tensor) else ins[0][i]
                 for i in range(len(data_pos))],
                [None if outs[0][i] is None else torch.cat([b[i] for b in outs]) for i in range(len(outs[0]))])

    def loss(self, k: int, q_in: list, fp_out: list, idx: Tensor | None = None, target: LossTarget = "mixer"
             ) -> Tensor:
        """Loss of block k on the captured quantized-path inputs (all, or the mini-batch ``idx``) against the FP
        outputs, on the mixer's output or the residual stream after the block (``target``). Parameters are read
        from the split model at call time so that gradients reach the prepared model's own."""
        first = next(v for v in q_in if isinstance(v, Tensor))
        batch = len(first) if idx is None else len(idx)

        def data(v):
            if v is _BATCH:
                return batch
            return v if idx is None or not isinstance(v, Tensor) else v[idx]

        args = [operator.attrgetter(ref)(self.split) if kind == "attr" else data(q_in[ref])
                for kind, ref in self._specs[k]]
        q_out = _as_tuple(self._submods[2 * k + 1](*args))
        return self.loss_of_outputs(k, [t if idx is None or t is None else t[idx] for t in fp_out], q_out, target)

    def loss_of_outputs(self, k: int, fp_out: list, q_out, target: LossTarget = "mixer") -> Tensor:
        """The loss of :meth:`loss` on block k's outputs already computed, e.g. those :meth:`capture` returns with
        fake quantization on (the loss before any learning, without running the block again)."""
        pairs = [(t, q) for t, q, own in zip(fp_out, q_out, self._own[k]) if t is not None and own]
        if target == "stream":
            streams = [(t, q) for t, q in zip(fp_out, q_out) if t is not None]
            pairs = [(sum(t for t, _ in streams), sum(q for _, q in streams))]
        return _loss([t for t, _ in pairs], [q for _, q in pairs])

    def frozen_except(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Switch off ``requires_grad`` of every other parameter of the prepared model; returns those to restore."""
        learned = {id(p) for p in params}
        frozen = [p for p in self.prepared.parameters() if p.requires_grad and id(p) not in learned]
        for p in frozen:
            p.requires_grad_(False)
        return frozen


class BlockMethod(abc.ABC):
    """What a block-wise method does in :func:`optimize_blocks`, block by block; the hooks without a body do nothing.

    The loop calls, for block ``k``: :meth:`begin` (what to learn), then per step the loss of a mini-batch plus
    :meth:`penalty`, backward, :meth:`after_backward`, the optimizer's step and :meth:`after_step`; then :meth:`end`.
    """

    @abc.abstractmethod
    def begin(self, runner: BlockRunner, k: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer] | None:
        """The parameters of the prepared model block ``k`` learns and the optimizer that steps them (which may
        hold other tensors, e.g. their logarithms); ``None``: nothing to learn in this block."""

    def loss_before(self, runner: BlockRunner, k: int, q_in: list, fp_out: list, q_out: list) -> float:
        """The block's loss before learning (default: on the captured fake-quantized outputs)."""
        return runner.loss_of_outputs(k, fp_out, q_out, self.target).item()

    def penalty(self, step: int, steps: int) -> Tensor | float:
        """A term added to the reconstruction loss at ``step`` (1-based) of ``steps``."""
        return 0.0

    def after_backward(self) -> None:
        """After ``backward``, before the optimizer's step (e.g. gradient transforms, clipping)."""

    def after_step(self, step: int, steps: int, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer's step ``step`` (1-based) of ``steps``."""

    def end(self, runner: BlockRunner, k: int) -> bool:
        """After the block's last step, before its final loss; returns whether it changed the block."""
        return False

    target: LossTarget = "mixer"  # what the reconstruction loss compares (see BlockRunner.loss)


@dataclass(frozen=True)
class BlockLosses:
    """Per-block reconstruction loss before and after :func:`optimize_blocks`."""

    before: list[float]
    after: list[float]


def optimize_blocks(runner: BlockRunner, method: BlockMethod, steps: int, batch_size: int | None, seed: int,
                    desc: str, progress: bool = True) -> BlockLosses:
    """The per-block training loop of JLSS and ViM-VQ.

    For each block in order: capture its floating-point target and its fake-quantized inputs, learn what
    ``method.begin`` returns for ``steps`` steps on mini-batches of ``batch_size`` images (``None``: all of them)
    drawn with ``seed``, with every other parameter of the prepared model frozen, and record the loss before and
    after.
    """
    gen = torch.Generator().manual_seed(seed)
    n, share, processes = runner.total, runner.share, distributed.world_size()
    before, after = [], []

    def whole(local_mean: float) -> float:
        """The mean over all the images of a mean over this process's."""
        if processes == 1:
            return local_mean
        return distributed.all_reduce_(torch.tensor([local_mean * len(share) / n], dtype=torch.float64))[0].item()

    for k, block in enumerate(runner.blocks):
        q_in = fp_out = None  # the previous block's captures go before this block's are made
        _, fp_out = runner.capture(k, fake_quant=False)
        q_in, q_out = runner.capture(k, fake_quant=True)
        with torch.no_grad():
            before.append(whole(method.loss_before(runner, k, q_in, fp_out, q_out)))
        del q_out
        learned = method.begin(runner, k) if steps else None
        if learned is not None:
            params, optimizer = learned
            frozen = runner.frozen_except(params)
            try:
                bar = tqdm(range(1, steps + 1), desc=f"{desc} {block}", disable=not progress, leave=False)
                for step in bar:
                    chosen = None if batch_size is None or batch_size >= n else torch.randperm(
                        n, generator=gen)[:batch_size]
                    idx, weight = _local_part(chosen, share, n)
                    recon = runner.loss(k, q_in, fp_out, idx, method.target) * weight if weight else None
                    loss = (0.0 if recon is None else recon) + method.penalty(step, steps) / processes  # counted once
                    optimizer.zero_grad(set_to_none=True)
                    for p in params:  # the optimizer may hold other tensors than these
                        p.grad = None
                    if isinstance(loss, Tensor):
                        loss.backward()
                    if processes > 1:
                        _sum_gradients(params)
                    method.after_backward()
                    optimizer.step()
                    method.after_step(step, steps, optimizer)
                    if recon is not None:
                        bar.set_postfix(loss=f"{recon.item() / weight:.4g}", refresh=False)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        if not method.end(runner, k) and learned is None:
            after.append(before[-1])  # nothing changed
            continue
        with torch.no_grad():
            after.append(whole(runner.loss(k, q_in, fp_out, target=method.target).item()))
    return BlockLosses(before, after)


def _local_part(chosen: Tensor | None, share: range, n: int) -> tuple[Tensor | None, float]:
    """The mini-batch ``chosen`` (indices into all ``n`` images; ``None``: all of them) as indices into this process's
    share, and that part's weight in the mini-batch's mean."""
    if chosen is None:
        return None, len(share) / n
    mine = chosen[(chosen >= share.start) & (chosen < share.stop)] - share.start
    return (mine if len(mine) < len(chosen) else chosen), len(mine) / len(chosen)


def _sum_gradients(params: list[nn.Parameter]) -> None:
    """Every parameter's gradient summed over the processes, in one message (a process whose share of the mini-batch
    was empty contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()
