"""Top-1 accuracy for any callable model (eager, exported, fake-quantized, lowered): on the Fashion-MNIST test set,
on a labelled image folder, or, without labels, agreement with a reference model."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vmq_fx import distributed
from vmq_fx.app.data import fashion_mnist, normalize

__all__ = ["Agreement", "EvalResult", "agreement", "evaluate", "evaluate_folder", "predict"]


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    correct: int
    total: int
    seconds: float

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f}% ({self.correct}/{self.total}) in {self.seconds:.1f} s"


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 500, progress: bool = False,
            desc: str = "eval") -> Tensor:
    """Logits of ``model`` on normalized images [N, 1, 28, 28], in batches. Under ``torchrun`` each process runs its
    share of the batches (:func:`vmq_fx.distributed.batch_shard`) and every process gets all the logits, in order."""
    shard = distributed.batch_shard(len(images), batch_size)
    outs = []
    for start in tqdm(range(shard.start, shard.stop, batch_size), desc=desc, disable=not progress, leave=False):
        outs.append(model(images[start:min(start + batch_size, shard.stop)]))
    return distributed.all_gather_rows(torch.cat(outs) if outs else None)


def evaluate(model: Callable[[Tensor], Tensor], split: str = "test", limit: int | None = None, batch_size: int = 500,
             data_dir: str | os.PathLike | None = None, progress: bool = True) -> EvalResult:
    """Top-1 accuracy of ``model`` on a Fashion-MNIST split (under ``torchrun``: the batches shared out over the
    processes, the same result on every one).

    Args:
        model: anything callable on a float [batch, 1, 28, 28] tensor returning logits: an ``nn.Module`` in eval mode,
            ``ExportedProgram.module()``, a prepared / converted / lowered ``GraphModule``.
        split: ``"test"`` (10,000 images) or ``"train"``.
        limit: evaluate only the first ``limit`` images.
        batch_size: images per forward call.
        data_dir: Fashion-MNIST directory (see :mod:`vmq_fx.app.data`).
        progress: show a progress bar.

    Example:
        >>> from vmq_fx.models import load_reference
        >>> from vmq_fx.app.evaluate import evaluate
        >>> print(evaluate(load_reference("vim-fm-tiny"), limit=1000, progress=False))  # doctest: +ELLIPSIS
        top-1 ...% (.../1000) in ... s
    """
    images, labels = fashion_mnist(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    t0 = time.perf_counter()
    logits = predict(model, normalize(images), batch_size, progress, desc=f"eval {split}")
    correct = int((logits.argmax(-1) == labels).sum())
    return EvalResult(100.0 * correct / len(labels), correct, len(labels), time.perf_counter() - t0)


def evaluate_folder(model: Callable[[Tensor], Tensor], folder, batch_size: int = 64, workers: int | None = None,
                    progress: bool = True) -> EvalResult:
    """Top-1 accuracy of ``model`` on a labelled image folder (:class:`vmq_fx.app.images.ImageFolder`), streamed
    (under ``torchrun``: the batches shared out over the processes, the counts summed).

    Example:
        >>> from vmq_fx.app.images import ImageFolder
        >>> folder = ImageFolder.open("imagenet/val", 1000, model.config.preprocess)  # doctest: +SKIP
        >>> print(evaluate_folder(model, folder))  # doctest: +SKIP
    """
    import dataclasses

    from vmq_fx.app.images import batches

    t0 = time.perf_counter()
    shard = distributed.batch_shard(len(folder.files), batch_size)
    mine = dataclasses.replace(folder, files=folder.files[shard.start:shard.stop],
                               labels=folder.labels[shard.start:shard.stop])
    correct = total = 0
    with torch.no_grad():
        for x, y in tqdm(batches(mine, batch_size, workers), total=-(-len(mine.files) // batch_size),
                         desc=f"eval {folder.root.name}", disable=not progress, leave=False):
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    correct, total = distributed.all_reduce_sum([correct, total])
    return EvalResult(100.0 * correct / total, correct, total, time.perf_counter() - t0)


@dataclass(frozen=True)
class Agreement:
    """How closely a model follows a reference on the same images (no labels needed)."""

    top1: float  # percent of images where both predict the same class
    sqnr_db: float  # 10 log10(|reference logits|^2 / |difference|^2), over all images
    total: int

    def __str__(self) -> str:
        return f"top-1 agreement {self.top1:.2f}% and logit SQNR {self.sqnr_db:.1f} dB on {self.total} images"


@torch.no_grad()
def agreement(model: Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor], images: Tensor,
              batch_size: int = 64) -> Agreement:
    """Top-1 agreement and logit SQNR of ``model`` against ``reference`` on ``images`` [N, C, H, W]."""
    same = 0
    signal = noise = 0.0
    for x in images.split(batch_size):
        a, b = model(x).double(), reference(x).double()
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        signal += float(b.pow(2).sum())
        noise += float((a - b).pow(2).sum())
    sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise)
    return Agreement(100.0 * same / len(images), sqnr, len(images))
