"""Top-1 accuracy on the Fashion-MNIST test set for any callable model: eager, exported, fake-quantized, lowered."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vmq_fx.data import fashion_mnist, normalize

__all__ = ["EvalResult", "evaluate", "predict"]


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
    """Logits of ``model`` on normalized images [N, 1, 28, 28], in batches."""
    outs = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        outs.append(model(images[start:start + batch_size]))
    return torch.cat(outs)


def evaluate(model: Callable[[Tensor], Tensor], split: str = "test", limit: int | None = None, batch_size: int = 500,
             data_dir: str | os.PathLike | None = None, progress: bool = True) -> EvalResult:
    """Top-1 accuracy of ``model`` on a Fashion-MNIST split.

    Args:
        model: anything callable on a float [batch, 1, 28, 28] tensor returning logits: an ``nn.Module`` in eval mode,
            ``ExportedProgram.module()``, a prepared / converted / lowered ``GraphModule``.
        split: ``"test"`` (10,000 images) or ``"train"``.
        limit: evaluate only the first ``limit`` images.
        batch_size: images per forward call.
        data_dir: Fashion-MNIST directory (see :mod:`vmq_fx.data`).
        progress: show a progress bar.

    Example:
        >>> from vmq_fx.models import load_reference
        >>> from vmq_fx.evaluate import evaluate
        >>> print(evaluate(load_reference("vim-fm-tiny"), limit=1000))  # doctest: +SKIP
        top-1 91.30% (913/1000) in 1.2 s
    """
    images, labels = fashion_mnist(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    t0 = time.perf_counter()
    logits = predict(model, normalize(images), batch_size, progress, desc=f"eval {split}")
    correct = int((logits.argmax(-1) == labels).sum())
    return EvalResult(100.0 * correct / len(labels), correct, len(labels), time.perf_counter() - t0)
