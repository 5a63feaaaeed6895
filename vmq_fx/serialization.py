"""Saving and loading lowered quantized models as one safetensors file.

The file holds every tensor of the lowered graph module (codes, codebooks, integer weights, scales and the
floating-point parameters that stay) and, in its metadata, the model configuration and the recipe. Loading rebuilds
the same graph (export -> prepare -> a structural calibration on random images -> convert -> lower) and then loads the
tensors with strict key and shape checks, so the loaded model computes exactly what the saved one did.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx.calibration import calibrate, linear_quantizers
from vmq_fx.export import export_model
from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.registry import build_model
from vmq_fx.models.vim import VimConfig
from vmq_fx.models.vmamba import VMambaConfig
from vmq_fx.observers import VectorQuantizedWeight
from vmq_fx.ops.integer_linear import pack_int4, unpack_int4
from vmq_fx.passes import lower
from vmq_fx.passes.int4_storage import int4_weight_names
from vmq_fx.quantizer import PTQ4VMRecipe, VisualMambaQuantizer, VQRecipe

__all__ = ["load_quantized", "save_quantized"]

_FORMAT = "vmq_fx.lowered/2"  # /2: integer linears carry their column sums; 4-bit weights are listed as packed
_CONFIGS = {c.__name__: c for c in (VimConfig, VMambaConfig)}
_RECIPES = {c.__name__: c for c in (PTQ4VMRecipe, VQRecipe)}


def _encode(obj) -> str:
    return json.dumps({"type": type(obj).__name__, "fields": dataclasses.asdict(obj)})


def _decode(text: str, table: dict, what: str):
    blob = json.loads(text)
    if blob.get("type") not in table:
        raise ValueError(f"unknown {what} type {blob.get('type')!r} in the file; known: {sorted(table)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in blob["fields"].items()}
    return table[blob["type"]](**fields)


def save_quantized(lowered: fx.GraphModule, path: str | os.PathLike, config: VimConfig | VMambaConfig) -> None:
    """Write a lowered quantized model to ``path`` (safetensors).

    Args:
        lowered: the output of :func:`vmq_fx.lower`.
        path: the file to write.
        config: the configuration of the model that was quantized (``model.config``).

    Example:
        >>> vmq_fx.save_quantized(lowered, "vim_vq2.safetensors", model.config)  # doctest: +SKIP
        >>> same = vmq_fx.load_quantized("vim_vq2.safetensors")  # doctest: +SKIP
    """
    recipe = lowered.meta.get("vmq_recipe")
    if recipe is None:
        raise ValueError("save_quantized: not a model quantized with VisualMambaQuantizer (no recipe in its meta)")
    if type(config).__name__ not in _CONFIGS:
        raise TypeError(f"save_quantized: config must be a VimConfig or VMambaConfig, got {type(config).__name__}")
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    if torch.ops.vmq.vq_linear.default not in targets and torch.ops.vmq.int8_linear.default not in targets:
        raise ValueError("save_quantized: the model is not lowered (no vmq.int8_linear / vmq.vq_linear node); run "
                         "vmq_fx.lower(convert_pt2e(prepared)) first")
    tensors = {k: v.detach().contiguous() for k, v in lowered.state_dict().items()}
    packed = int4_weight_names(lowered)  # 4-bit weights go to the file two per byte
    for name in packed:
        tensors[name] = pack_int4(tensors[name])
    meta = {"format": _FORMAT, "config": _encode(config), "recipe": _encode(recipe), "int4_packed": json.dumps(packed)}
    save_file(tensors, os.fspath(path), metadata=meta)


def _structure(config, recipe) -> fx.GraphModule:
    """The lowered graph for ``config`` and ``recipe``, with placeholder values (shapes only)."""
    model = build_model(config).eval()
    example = torch.randn(2, config.in_chans, config.img_size, config.img_size,
                          generator=torch.Generator().manual_seed(0))
    prepared = prepare_pt2e(export_model(model, example).module(), VisualMambaQuantizer(recipe))
    calibrate(prepared, example, progress=False)
    for _, _, weight in linear_quantizers(prepared).values():
        if isinstance(weight, VectorQuantizedWeight):
            weight.harden()
    return lower(convert_pt2e(prepared))


def load_quantized(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save_quantized`: the lowered graph module, ready to run.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a vmq_fx quantized-model file.
        vmq_fx.models.CheckpointMismatchError: its tensors do not fit the graph its metadata describes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantized model not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not a safetensors file: name it, keep the cause
        raise ValueError(f"could not read {path} as safetensors: {e}") from e
    if meta.get("format") != _FORMAT:
        old = str(meta.get("format", "")).startswith("vmq_fx.lowered/")
        raise ValueError(f"{path}: not a vmq_fx quantized model of this version (format {meta.get('format')!r}, "
                         f"expected {_FORMAT!r})" + ("; quantize the model again with this version" if old else ""))
    config = _decode(meta["config"], _CONFIGS, "model config")
    recipe = _decode(meta["recipe"], _RECIPES, "recipe")
    gm = _structure(config, recipe)
    own = gm.state_dict()
    for name in json.loads(meta.get("int4_packed", "[]")):
        if name in tensors and name in own:
            tensors[name] = unpack_int4(tensors[name], own[name].shape[1])
    load_state_dict_strict(gm, tensors, source=path)
    gm.meta["vmq_config"] = config
    return gm
