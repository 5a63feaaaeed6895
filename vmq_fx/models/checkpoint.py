"""Loading Vim and VMamba checkpoints: official files as released or as their training scripts write them.

:func:`load_checkpoint` reads a ``.pth`` / ``.pt`` (``torch.load`` with ``weights_only=True``; the ``argparse.Namespace``
that the Vim and VMamba training scripts store under ``"args"`` is allow-listed, nothing else is unpickled) or a
``.safetensors`` file; takes the state dict from ``"model"`` (or ``"model_ema"`` with ``use_ema``, or
``"state_dict"``, or the file itself); tells Vim from VMamba by their keys; converts the released VMamba layout
(stacked per-direction ``x_proj_weight`` / ``dt_projs_weight`` / ``dt_projs_bias``, ``classifier.norm`` /
``classifier.head``) into vmq_fx's; infers the configuration from the tensor shapes when none is named; and loads
with strict key and shape checks. Every refusal names the file and the keys that decided it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from vmq_fx.models.registry import MODEL_CONFIGS, build_model, with_overrides
from vmq_fx.models.vim import VimConfig
from vmq_fx.models.vmamba import VMambaConfig

__all__ = ["CheckpointMismatchError", "infer_config", "load_checkpoint", "load_state_dict_strict", "read_state_dict"]

log = logging.getLogger(__name__)

_SHOWN = 8


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into, or cannot be told apart."""


def _preview(keys) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key raises an error listing them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_preview(shapes)}")
        if len(missing) > len(own) // 2:
            lines.append("  (most keys differ: is this a checkpoint of another architecture or configuration?)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


# -- reading -----------------------------------------------------------------------------------------------------------
def _torch_load(path: str):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, not a torch file, or a global outside the allow-list
        text = str(e)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        if unsafe:
            raise ValueError(f"{path}: holds a pickled {unsafe.group(1)} object, which is not loaded (only tensors, "
                             "containers and argparse.Namespace are); save the state dict alone "
                             "(torch.save({'model': model.state_dict()}, path))") from e
        raise ValueError(f"could not read {path} as a torch checkpoint: {text.strip().splitlines()[0][:300]}") from e


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """The model state dict inside a checkpoint file.

    Args:
        path: ``.safetensors``, or a torch file: a state dict, or a dict holding one under ``"model"`` (Vim /
            VMamba training scripts), ``"model_ema"`` or ``"state_dict"``.
        use_ema: take ``"model_ema"`` (the exponential moving average the training scripts keep) instead of
            ``"model"``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or no state dict where one was expected (the keys found are named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            blob = load_file(path)
        except Exception as e:  # not a safetensors file: name it
            raise ValueError(f"could not read {path} as safetensors: {str(e).splitlines()[0][:300]}") from e
    else:
        blob = _torch_load(path)
    if not isinstance(blob, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict holding one, found a {type(blob).__name__}")
    key = "model_ema" if use_ema else next((k for k in ("model", "state_dict") if k in blob), None)
    if key is not None:
        if key not in blob:
            raise ValueError(f"{path}: no 'model_ema' entry for use_ema (entries: {_preview(sorted(blob))})")
        state = blob[key]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: entry {key!r} is a {type(state).__name__}, not a state dict")
    else:
        state = blob
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: expected a state dict of tensors{f' under {key!r}' if key else ''}; "
                         f"these entries are not tensors: {_preview(not_tensors)}")
    prefix = "module."  # DistributedDataParallel
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


# -- layouts ---------------------------------------------------------------------------------------------------------
_VIM_KEY = re.compile(r"layers\.(\d+)\.mixer\.in_proj\.weight")
_VMAMBA_KEY = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.norm\.weight")


def _family(state: Mapping[str, Tensor], source: str) -> str:
    vim = [k for k in state if _VIM_KEY.fullmatch(k)]
    vmamba = [k for k in state if _VMAMBA_KEY.fullmatch(k)]
    if vim and vmamba:
        raise CheckpointMismatchError(f"{source}: holds both Vim keys ({_preview(vim)}) and VMamba keys "
                                      f"({_preview(vmamba)}): cannot tell which model it is")
    if not vim and not vmamba:
        raise CheckpointMismatchError(
            f"{source}: neither a Vim checkpoint (no layers.N.mixer.in_proj.weight) nor a VMamba one (no "
            f"layers.N.blocks.M.norm.weight); its first keys: {_preview(sorted(state))}")
    return "vim" if vim else "vmamba"


def _vmamba_to_vmq(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released VMamba layout -> vmq_fx's: split the stacked per-direction projections, rename the classifier."""
    out = {}
    for key, value in state.items():
        stem, _, name = key.rpartition(".")
        if name == "x_proj_weight":
            out.update({f"{stem}.x_proj.{k}.weight": value[k] for k in range(value.shape[0])})
        elif name == "dt_projs_weight":
            out.update({f"{stem}.dt_proj.{k}.weight": value[k] for k in range(value.shape[0])})
        elif name == "dt_projs_bias":
            out.update({f"{stem}.dt_proj.{k}.bias": value[k] for k in range(value.shape[0])})
        elif key.startswith("classifier."):
            out[key[len("classifier."):]] = value
        elif re.fullmatch(r".*\.(in_proj|out_proj|fc1|fc2)\.weight", key) and value.dim() == 4:
            out[key] = value.flatten(1)  # Linear2d of the channel-first models, stored as a 1x1 convolution
        else:
            out[key] = value
    if "patch_embed.0.weight" in out and "patch_embed.5.weight" not in out:  # first-generation patch embedding
        for part, new in (("0", "patch_embed"), ("2", "patch_norm")):
            for p in ("weight", "bias"):
                if f"patch_embed.{part}.{p}" in out:
                    out[f"{new}.{p}"] = out.pop(f"patch_embed.{part}.{p}")
    return out


def _need(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"{source}: cannot infer the configuration without {key}")
    return state[key]


def _infer_vim(state: Mapping[str, Tensor], source: str) -> VimConfig:
    proj = _need(state, "patch_embed.proj.weight", source)
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(_VIM_KEY.fullmatch(k).group(1)) for k in state if _VIM_KEY.fullmatch(k))
    tokens = _need(state, "pos_embed", source).shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointMismatchError(f"{source}: pos_embed has {tokens} positions, not a square grid of patches + "
                                      "one class token (Vim with the middle class token); give the configuration")
    if "layers.0.mixer.x_proj_b.weight" not in state:
        raise CheckpointMismatchError(f"{source}: no layers.0.mixer.x_proj_b.weight: vmq_fx loads Vim with the "
                                      "bidirectional v2 mixer (bimambav2) only")
    d_state = _need(state, "layers.0.mixer.A_log", source).shape[1]
    dt_rank = _need(state, "layers.0.mixer.dt_proj.weight", source).shape[1]
    if dt_rank != math.ceil(dim / 16) or state["layers.0.mixer.in_proj.weight"].shape[0] != 4 * dim:
        raise CheckpointMismatchError(f"{source}: layers.0.mixer.dt_proj.weight / in_proj.weight shapes are not "
                                      "Vim's (dt_rank ceil(dim / 16), expand 2)")
    classes = _need(state, "head.weight", source).shape[0]
    return VimConfig(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                     d_state=d_state, num_classes=classes)


def _infer_vmamba(state: Mapping[str, Tensor], source: str) -> VMambaConfig:
    """From vmq_fx-layout keys (after :func:`_vmamba_to_vmq`)."""
    blocks: dict[int, int] = {}
    for k in state:
        m = _VMAMBA_KEY.fullmatch(k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise CheckpointMismatchError(f"{source}: stages {stages} are not numbered 0..N-1")
    dims = tuple(state[f"layers.{i}.blocks.0.norm.weight"].shape[0] for i in stages)
    op = "layers.0.blocks.0.op"
    d_inner = _need(state, f"{op}.out_norm.weight", source).shape[0]
    in_proj = _need(state, f"{op}.in_proj.weight", source).shape[0]
    if in_proj not in (d_inner, 2 * d_inner):
        raise CheckpointMismatchError(f"{source}: {op}.in_proj.weight has {in_proj} outputs for d_inner {d_inner}")
    conv = _need(state, f"{op}.conv2d.weight", source)
    v2 = "patch_embed.5.weight" in state
    embed = _need(state, "patch_embed.0.weight" if v2 else "patch_embed.weight", source)
    in_chans, patch = embed.shape[1], 4 if v2 else embed.shape[-1]
    fc1 = state.get("layers.0.blocks.0.mlp.fc1.weight")
    ranks = [_need(state, f"layers.{i}.blocks.0.op.dt_proj.0.weight", source).shape[1] for i in stages]
    if ranks == [math.ceil(d / 16) for d in dims]:
        dt_rank = None  # "auto", per stage
    elif len(set(ranks)) == 1:
        dt_rank = ranks[0]
    else:
        raise CheckpointMismatchError(f"{source}: the dt_proj ranks of the stages ({ranks}) are neither ceil(dim / 16) "
                                      "nor one value")
    down = "v3" if "layers.0.downsample.1.weight" in state else "v1"
    if len(stages) > 1 and down == "v1" and "layers.0.downsample.reduction.weight" not in state:
        raise CheckpointMismatchError(f"{source}: layers.0.downsample is neither patch merging (reduction) nor the v3 "
                                      "convolution (downsample.1)")
    return VMambaConfig(
        patch_size=patch, in_chans=in_chans, dims=dims, depths=tuple(blocks[i] for i in stages),
        d_state=_need(state, f"{op}.A_logs", source).shape[1], ssm_ratio=d_inner / dims[0],
        mlp_ratio=0.0 if fc1 is None else fc1.shape[0] / dims[0], gate=in_proj == 2 * d_inner,
        num_classes=_need(state, "head.weight", source).shape[0], patch_embed="v2" if v2 else "v1",
        downsample=down, d_conv=conv.shape[-1], conv_bias=f"{op}.conv2d.bias" in state,
        dt_rank=dt_rank)


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> VimConfig | VMambaConfig:
    """The configuration a (vmq_fx-layout) state dict was trained with, from its keys and shapes."""
    return _infer_vim(state, source) if _family(state, source) == "vim" else _infer_vmamba(state, source)


def _named(cfg) -> str | None:
    """The named configuration with the same architecture (preprocessing and training-only fields aside)."""
    def arch(c):
        return dataclasses.replace(c, drop_path_rate=0.0, preprocess=None)

    return next((name for name, c in MODEL_CONFIGS.items() if type(c) is type(cfg) and arch(c) == arch(cfg)), None)


def load_checkpoint(path: str | os.PathLike, config: str | VimConfig | VMambaConfig | None = None,
                    use_ema: bool = False, **overrides) -> nn.Module:
    """A Vim or VMamba model from a checkpoint file, in eval mode.

    Args:
        path: official Vim (hustvl/Vim) or VMamba (MzeroMiko/VMamba v2 / v2v) checkpoints as released or as their
            training scripts write them (with ``args``, ``optimizer``, ``model_ema`` ...), or a state dict saved from
            a vmq_fx model (``.pth`` or ``.safetensors``).
        config: a configuration name (``vim_tiny``, ``vmambav2v_tiny``, ... see ``vmq list``) or object; ``None``
            infers it from the tensor shapes.
        use_ema: load the ``model_ema`` weights.
        **overrides: configuration fields to change (e.g. ``img_size`` for a VMamba, which has no position
            embedding, or ``preprocess``).

    Example:
        >>> import torch, tempfile, os
        >>> from vmq_fx.models import create_model, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "vim.pth")
        >>> torch.save({"model": create_model("vim_fm_tiny").state_dict()}, path)
        >>> load_checkpoint(path).config.depth
        8
    """
    source = os.fspath(path)
    if isinstance(config, str) and config not in MODEL_CONFIGS:  # before reading a possibly large file
        raise ValueError(f"unknown configuration {config!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    state = read_state_dict(source, use_ema=use_ema)
    family = _family(state, source)
    if family == "vmamba":
        state = _vmamba_to_vmq(state)
    if config is None:
        cfg = infer_config(state, source)
        name = _named(cfg)
        if name:  # a released shape: take the named configuration, with its preprocessing
            cfg = dataclasses.replace(MODEL_CONFIGS[name], drop_path_rate=0.0)
        log.info("%s: %s", source, f"the {name} configuration" if name else f"inferred configuration {cfg}")
    else:
        cfg = MODEL_CONFIGS[config] if isinstance(config, str) else config
        if (family == "vim") != isinstance(cfg, VimConfig):
            raise CheckpointMismatchError(f"{source} is a {'Vim' if family == 'vim' else 'VMamba'} checkpoint, but "
                                          f"the configuration given is a {type(cfg).__name__}")
    model = build_model(with_overrides(cfg, **overrides))
    load_state_dict_strict(model, state, source=source)
    return model.eval()
