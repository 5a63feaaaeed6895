"""Helpers over a prepared graph: the observers of each quantized linear, read from the graph (nothing is kept
beside it), and the batching of calibration data."""
from __future__ import annotations

import torch
from torch import Tensor, fx

from vmq_fx.pt2e.observers import VectorQuantizedWeight
from vmq_fx.pt2e.quantizer import QuantizedLinear, quantized_linears

__all__ = ["codebook_groups", "linear_quantizers", "set_fake_quant", "split_batches"]


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


def split_batches(data, batch_size: int) -> list[Tensor]:
    """Calibration data as a list of image batches: a tensor is split, an iterable's items (or their first
    element, for (image, label) pairs) are taken as they are."""
    if isinstance(data, Tensor):
        return list(data.split(batch_size))
    out = []
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(f"calibration data must yield tensors or (tensor, label) pairs, got {type(x).__name__}")
        out.append(x)
    return out
