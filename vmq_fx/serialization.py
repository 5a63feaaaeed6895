"""Saving and loading lowered quantized models.

A model with a vmq_fx configuration (``VimConfig`` / ``VMambaConfig``: the shipped models, checkpoints loaded with
:func:`vmq_fx.models.load_checkpoint`) goes to one ``.safetensors`` file: every tensor of the lowered graph (codes,
codebooks, integer weights with 4-bit ones packed two per byte, scales, the floating-point parameters that stay) and,
in its metadata, the configuration and the quantizer's recipes. Loading rebuilds the same graph from them (export ->
prepare -> quantizers given placeholder parameters of the right shapes -> convert -> lower; no calibration data runs)
and loads the tensors with strict key and shape checks, so the loaded model computes exactly what the saved one did.

Any other lowered model (one adapted from mamba-ssm, say) goes to a ``.pt2`` archive of ``torch.export``, which holds
its graph as well: ``load_quantized`` of a ``.pt2`` is ``torch.export.load(path).module()``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from vmq_fx.calibration import codebook_groups, linear_quantizers
from vmq_fx.export import export_model
from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.registry import build_model
from vmq_fx.models.vim import VimConfig
from vmq_fx.models.vmamba import VMambaConfig
from vmq_fx.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize
from vmq_fx.observers.codebook import initialize_codebook_group
from vmq_fx.ops.integer_linear import pack_int4, unpack_int4
from vmq_fx.passes import lower
from vmq_fx.passes.int4_storage import int4_weight_names
from vmq_fx.quantizer import QuantizerSpec, VisualMambaQuantizer
from vmq_fx.recipes import PTQ4VMRecipe, Schedule, VQRecipe

__all__ = ["load_quantized", "save_quantized"]

_FORMAT = "vmq_fx.lowered/3"  # /3: the quantizer's recipes (mixed precision); integer linears carry column sums
_CONFIGS = {c.__name__: c for c in (VimConfig, VMambaConfig)}
_RECIPES = {c.__name__: c for c in (PTQ4VMRecipe, VQRecipe)}


def _recipe_json(recipe):
    return None if recipe is None else {"type": type(recipe).__name__, "fields": dataclasses.asdict(recipe)}


def _recipe_from(blob):
    if blob is None:
        return None
    if blob.get("type") not in _RECIPES:
        raise ValueError(f"unknown recipe type {blob.get('type')!r} in the file; known: {sorted(_RECIPES)}")
    fields = dict(blob["fields"])
    fields["schedule"] = Schedule(**fields.get("schedule", {}))
    return _RECIPES[blob["type"]](**fields)


def _spec_json(spec: QuantizerSpec) -> str:
    return json.dumps({"global": _recipe_json(spec.global_recipe),
                       "module_names": [[p, _recipe_json(r)] for p, r in spec.module_names],
                       "roles": [[p, _recipe_json(r)] for p, r in spec.roles]})


def _spec_from(text: str) -> QuantizerSpec:
    blob = json.loads(text)
    return QuantizerSpec(_recipe_from(blob["global"]), tuple((p, _recipe_from(r)) for p, r in blob["module_names"]),
                         tuple((p, _recipe_from(r)) for p, r in blob["roles"]))


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
        path: a ``.safetensors`` file (models with a vmq_fx configuration) or a ``.pt2`` archive (any model).
        config: the configuration of the model that was quantized (``model.config``; ``None``: the one recorded
            by :func:`vmq_fx.quantize` / :func:`load_quantized`, if any).

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
    if path.endswith(".pt2"):
        placeholder = next(n for n in lowered.graph.nodes if n.op == "placeholder").meta["val"]
        example = torch.zeros(2, *[int(d) for d in placeholder.shape[1:]])
        ep = torch.export.export(lowered, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, path)
        return
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_quantized: {path}: the file name must end in .safetensors or .pt2")
    if type(config).__name__ not in _CONFIGS:
        raise ValueError("save_quantized: a .safetensors file needs the model's VimConfig / VMambaConfig (config=...);"
                         " save a model without one (adapted from mamba-ssm, say) to a .pt2 archive")
    spec = lowered.meta.get("vmq_quantizer")
    if spec is None:
        raise ValueError("save_quantized: not a model quantized with VisualMambaQuantizer (no quantizer in its meta)")
    tensors = {k: v.detach().contiguous() for k, v in lowered.state_dict().items()}
    packed = int4_weight_names(lowered)  # 4-bit weights go to the file two per byte
    for name in packed:
        tensors[name] = pack_int4(tensors[name])
    meta = {"format": _FORMAT, "config": json.dumps({"type": type(config).__name__,
                                                     "fields": dataclasses.asdict(config)}),
            "quantizer": _spec_json(spec), "int4_packed": json.dumps(packed)}
    save_file(tensors, path, metadata=meta)


def _placeholder_parameters(prepared: fx.GraphModule) -> None:
    """Give every quantizer parameters of the right shapes (ones and zeros): the lowered graph's structure depends on
    the shapes only, and the saved tensors replace the values."""
    nodes = {n.name: n for n in prepared.graph.nodes}
    quantizers = linear_quantizers(prepared)
    weight_shapes = {}
    for name, (layer, act, weight) in quantizers.items():
        x, w = (a.args[0].meta["val"] if a.op == "call_module" else a.meta["val"] for a in nodes[name].args[:2])
        weight_shapes[layer.name] = tuple(w.shape)
        if isinstance(act, PerTokenStaticFakeQuantize):
            act.initialize_placeholder(x.shape[1], x.shape[2])
            if act.smooth is not None:
                weight.share_smooth(act.smooth)
        elif isinstance(act, MinMaxObserver):
            act.min_val, act.max_val = torch.tensor(0.0), torch.tensor(1.0)
        if isinstance(weight, PerChannelWeightFakeQuantize):
            weight.initialize_placeholder(tuple(w.shape))
    for key, group in codebook_groups(quantizers).items():
        initialize_codebook_group([w for _, w in group], key, shapes=[weight_shapes[layer.name] for layer, _ in group])


def _structure(config, spec: QuantizerSpec) -> fx.GraphModule:
    """The lowered graph for ``config`` and ``spec``, with placeholder values."""
    model = build_model(config).eval()
    example = torch.zeros(2, config.in_chans, config.img_size, config.img_size)
    prepared = prepare_pt2e(export_model(model, example).module(), VisualMambaQuantizer.from_spec(spec))
    _placeholder_parameters(prepared)
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
    config = _config_from(meta["config"])
    gm = _structure(config, _spec_from(meta["quantizer"]))
    own = gm.state_dict()
    for name in json.loads(meta.get("int4_packed", "[]")):
        if name in tensors and name in own:
            tensors[name] = unpack_int4(tensors[name], own[name].shape[1])
    load_state_dict_strict(gm, tensors, source=path)
    gm.meta["vmq_config"] = config
    return gm
