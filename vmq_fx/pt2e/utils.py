"""Helpers over a prepared graph: the observers of each quantized linear, read from the graph (nothing is kept
beside it), and the batching of calibration data.

Calibration data comes in three forms: one tensor ``[N, C, H, W]``; a map-style :class:`torch.utils.data.Dataset`
of images (or ``(image, label)`` pairs), read item by item, so that under ``torchrun`` each process reads and holds
only the images it computes on; or any other iterable of batches (a ``DataLoader``, a list), read whole by every
process.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx
from torch.utils.data import Dataset, IterableDataset

from vmq_fx.pt2e.observers import VectorQuantizedWeight
from vmq_fx.pt2e.quantizer import QuantizedLinear, quantized_linears

__all__ = ["codebook_groups", "example_images", "is_image_dataset", "linear_quantizers", "read_images",
           "set_fake_quant", "split_batches"]


def linear_quantizers(gm: fx.GraphModule) -> dict[str, tuple[QuantizedLinear, torch.nn.Module | None, torch.nn.Module]]:
    """For each linear a :class:`~vmq_fx.pt2e.quantizer.VisualMambaQuantizer` quantized in a prepared model, by node name:
    (layer, activation quantizer or ``None`` for weight-only recipes, weight quantizer), read from the graph: the
    observer modules in front of the linear."""
    out = {}
    for name, layer in quantized_linears(gm).items():
        node = next(n for n in gm.graph.nodes if n.name == name)
        weight_only = layer.recipe.act_qspec() is None
        mods = []
        for i, arg in enumerate(node.args[:2]):
            if i == 0 and weight_only:
                mods.append(None)
                continue
            if not (isinstance(arg, fx.Node) and arg.op == "call_module"):
                raise ValueError(f"{layer.name}: expected an observer in front of the linear; was the model prepared "
                                 "with prepare_pt2e and not converted yet?")
            mods.append(gm.get_submodule(str(arg.target)))
        out[name] = (layer, mods[0], mods[1])
    return out


def codebook_groups(quantizers: dict) -> dict[str, list[tuple[QuantizedLinear, VectorQuantizedWeight]]]:
    """The vector-quantized linears of a :func:`linear_quantizers` table by the codebook they share, keyed by the
    codebook's buffer name after convert: one group per block (``recipe.codebook == "block"``, linears of the same
    recipe) or per linear."""
    groups: dict[str, list] = {}
    recipes: dict[str, object] = {}
    for layer, _, weight in quantizers.values():
        if not isinstance(weight, VectorQuantizedWeight):
            continue
        scope = layer.block if layer.recipe.codebook == "block" else layer.name
        key = f"vq_codebook_{scope}".replace(".", "_")
        while key in recipes and recipes[key] != layer.recipe:  # another recipe in the same block: its own codebook
            key += "_"
        recipes[key] = layer.recipe
        groups.setdefault(key, []).append((layer, weight))
    return groups


def set_fake_quant(quantizers: dict, enabled: bool) -> None:
    """Switch fake quantization of every quantizer in a :func:`linear_quantizers` table on or off."""
    for _, act, weight in quantizers.values():
        for q in (act, weight):
            if q is not None:
                q.enable_fake_quant(enabled)


def is_image_dataset(data) -> bool:
    """Whether calibration data is a map-style dataset of single images (rather than a tensor or batches)."""
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset)


def _image(item) -> Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor):
        raise TypeError(f"calibration data must yield tensors or (tensor, label) pairs, got {type(x).__name__}")
    return x


def read_images(dataset: Dataset, indices: range) -> Tensor:
    """The images ``indices`` of a map-style dataset as one tensor ``[len(indices), C, H, W]``."""
    return torch.stack([_image(dataset[i]) for i in indices])


class _DatasetBatches(Sequence):
    """Batches of a map-style dataset of images, read when indexed (a slice stays unread)."""

    def __init__(self, dataset: Dataset, batch_size: int, batches: range | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.batches = range(-(-len(dataset) // batch_size)) if batches is None else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _DatasetBatches(self.dataset, self.batch_size, self.batches[i])
        start = self.batches[i] * self.batch_size
        return read_images(self.dataset, range(start, min(start + self.batch_size, len(self.dataset))))


def split_batches(data, batch_size: int) -> Sequence[Tensor]:
    """Calibration data as a sequence of image batches: a tensor is split, a map-style dataset is cut into batches
    read when indexed, an iterable's items (or their first element, for (image, label) pairs) are taken as they
    are."""
    if isinstance(data, Tensor):
        return list(data.split(batch_size))
    if is_image_dataset(data):
        return _DatasetBatches(data, batch_size)
    return [_image(item) for item in data]


def example_images(data, n: int) -> Tensor:
    """Up to ``n`` images from the start of calibration data (of its first batch, for an iterable of batches, which
    must then be iterable again: a list, a ``DataLoader``), e.g. to export the model with."""
    if isinstance(data, Tensor):
        return data[:n]
    if is_image_dataset(data):
        return read_images(data, range(min(n, len(data))))
    return _image(next(iter(data)))[:n]
