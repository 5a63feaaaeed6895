"""Saving and loading lowered quantized models.

A lowered model goes to one ``.safetensors`` file: every tensor of the lowered graph (codes, codebooks, integer weights
with 4-bit ones packed two per byte, scales, the floating-point parameters that stay) and, in its metadata, the graph
itself (:mod:`vmq_fx.export.graph_json`, zlib-compressed: its op calls, and each tensor's shape and dtype), the
model's configuration and the quantizer's recipes when there are any. Loading rebuilds the graph from that list
without tracing or calibrating anything and loads the tensors with strict key and shape checks, so the loaded model
computes exactly what the saved one did. Models without a vmq_fx configuration (adapted from mamba-ssm, say) are
saved the same way.

A ``.pt2`` path writes a ``torch.export`` archive instead (for tools that read those, e.g. AOTInductor);
``load_quantized`` of a ``.pt2`` is ``torch.export.load(path).module()``.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx

from vmq_fx.export.graph_json import graph_from_json, graph_to_json
from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.vim import VimConfig
from vmq_fx.models.vmamba import VMambaConfig
from vmq_fx.ops.int8_linear import pack_int4, unpack_int4
from vmq_fx.pt2e.lowering.int4_storage import int4_weight_names
from vmq_fx.pt2e.lowering.simplify import direct_attribute_reads
from vmq_fx.pt2e.quantizer import LAYER_META, QuantizedLinear
from vmq_fx.pt2e.recipes import RECIPE_FAMILIES, Recipe

__all__ = ["load_quantized", "save_quantized"]

_FORMAT = "vmq_fx.lowered/5"  # /5: each quantized linear's recipe, by node (/4 held the quantizer's settings)
_CONFIGS = {c.__name__: c for c in (VimConfig, VMambaConfig)}


def _recipe_json(recipe: Recipe) -> dict:
    return {"type": type(recipe).__name__, "fields": dataclasses.asdict(recipe)}


def _recipe_from(blob: dict) -> Recipe:
    family = RECIPE_FAMILIES.get(blob.get("type"))
    if family is None:
        raise ValueError(f"unknown recipe type {blob.get('type')!r} in the file; known: {sorted(RECIPE_FAMILIES)}")
    return family.recipe_type(**blob["fields"])


def _layers_json(lowered: fx.GraphModule) -> str:
    """The :class:`QuantizedLinear` (with its recipe) of every lowered linear, by node name."""
    return json.dumps({n.name: {**{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
                                   if f.name != "recipe"}, "recipe": _recipe_json(layer.recipe)}
                       for n in lowered.graph.nodes if (layer := n.meta.get(LAYER_META)) is not None})


def _attach_layers(gm: fx.GraphModule, text: str) -> None:
    layers = json.loads(text)
    for node in gm.graph.nodes:
        blob = layers.get(node.name)
        if blob is not None:
            node.meta[LAYER_META] = QuantizedLinear(**{**blob, "recipe": _recipe_from(blob["recipe"])})


def _config_from(text: str):
    blob = json.loads(text)
    if blob.get("type") not in _CONFIGS:
        raise ValueError(f"unknown model config type {blob.get('type')!r} in the file; known: {sorted(_CONFIGS)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in blob["fields"].items()}
    return _CONFIGS[blob["type"]](**fields)


def _check_lowered(lowered: fx.GraphModule) -> None:
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    if torch.ops.vmq.vq_linear.default not in targets and torch.ops.vmq.int8_linear.default not in targets:
        raise ValueError("save_quantized: the model is not lowered (no vmq.int8_linear / vmq.vq_linear node); run "
                         "vmq_fx.lower(convert_pt2e(prepared)) first")


def save_quantized(lowered: fx.GraphModule, path: str | os.PathLike, config: VimConfig | VMambaConfig | None = None,
                   ) -> None:
    """Write a lowered quantized model to ``path``.

    Args:
        lowered: the output of :func:`vmq_fx.lower`.
        path: a ``.safetensors`` file, or a ``.pt2`` archive of ``torch.export``.
        config: the configuration of the model that was quantized (``model.config``), kept in the file for the
            model's description; ``None``: the one recorded by :func:`vmq_fx.quantize` / :func:`load_quantized`, if
            any. Not needed to load the model.

    Raises:
        ValueError: the model is not lowered, the path has another extension, or the graph holds a call that cannot
            be stored (something other than a registered op).

    Example:
        >>> import os, tempfile, torch, vmq_fx
        >>> model = vmq_fx.models.create_model("vim_fm_tiny").eval()
        >>> lowered = vmq_fx.quantize(model, vmq_fx.recipes.per_tensor_static(8, 8), torch.randn(8, 1, 28, 28),
        ...                           progress=False).lowered
        >>> path = os.path.join(tempfile.mkdtemp(), "vim_w8a8.safetensors")
        >>> vmq_fx.save_quantized(lowered, path, model.config)
        >>> same = vmq_fx.load_quantized(path)
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.equal(same(x), lowered(x))
        True
    """
    _check_lowered(lowered)
    path = os.fspath(path)
    config = config if config is not None else lowered.meta.get("vmq_config")
    if config is not None and type(config).__name__ not in _CONFIGS:
        raise ValueError(f"save_quantized: config must be a VimConfig or VMambaConfig, not {type(config).__name__}")
    if path.endswith(".pt2"):
        example = torch.zeros(2, *_input_shape(lowered))
        ep = torch.export.export(lowered, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, path)
        return
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_quantized: {path}: the file name must end in .safetensors or .pt2")
    graph = base64.b64encode(zlib.compress(graph_to_json(lowered).encode(), 9)).decode()  # ~11x smaller
    tensors = {k: v.detach().contiguous() for k, v in lowered.state_dict().items()}
    packed = int4_weight_names(lowered)  # 4-bit weights go to the file two per byte
    for name in packed:
        tensors[name] = pack_int4(tensors[name])
    meta = {"format": _FORMAT, "graph": graph, "input_shape": json.dumps(_input_shape(lowered)),
            "int4_packed": json.dumps(packed)}
    if config is not None:
        meta["config"] = json.dumps({"type": type(config).__name__, "fields": dataclasses.asdict(config)})
    meta["layers"] = _layers_json(lowered)
    save_file(tensors, path, metadata=meta)


def _input_shape(lowered: fx.GraphModule) -> list[int]:
    """The input's shape after the batch dimension."""
    val = next(n for n in lowered.graph.nodes if n.op == "placeholder").meta["val"]
    return [int(d) for d in val.shape[1:]]


def load_quantized(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save_quantized`: the lowered graph module, ready to run.

    Its ``meta`` holds the configuration (``"vmq_config"``) when the file has it, each quantized linear's node its
    :class:`~vmq_fx.pt2e.quantizer.QuantizedLinear` with the recipe (``node.meta["vmq_linear"]``) as in the model
    that was saved, and its input node's ``meta["val"]`` is a meta-device tensor of the input's shape at batch 1.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a vmq_fx quantized-model file (of this version).
        vmq_fx.models.CheckpointMismatchError: its tensors do not fit the graph its metadata describes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantized model not found: {path}")
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
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
    try:
        graph = zlib.decompress(base64.b64decode(meta["graph"])).decode()
    except (KeyError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: its stored graph is unreadable ({type(e).__name__}: {e})") from e
    gm = graph_from_json(graph)
    own = gm.state_dict()
    for name in json.loads(meta.get("int4_packed", "[]")):
        if name in tensors and name in own:
            tensors[name] = unpack_int4(tensors[name], own[name].shape[1])
    load_state_dict_strict(gm, tensors, source=path)
    gm.requires_grad_(False)  # as lower() leaves it: an inference model
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    placeholder.meta["val"] = torch.empty(1, *json.loads(meta["input_shape"]), device="meta")
    if "config" in meta:
        gm.meta["vmq_config"] = _config_from(meta["config"])
    _attach_layers(gm, meta.get("layers", "{}"))
    return direct_attribute_reads(gm)
