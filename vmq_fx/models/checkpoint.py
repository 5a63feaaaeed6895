"""Loading Vim and VMamba checkpoints: official files as released or as their training scripts write them.

:func:`load_checkpoint` reads a ``.pth`` / ``.pt`` (``torch.load`` with ``weights_only=True``; besides tensors and
containers only the training scripts' metadata is unpickled: the ``argparse.Namespace`` stored under ``"args"`` and
VMamba's yacs ``CfgNode`` under ``"config"``, the latter as a plain dict without importing yacs) or a ``.safetensors``
file; takes the state dict from ``"model"`` (or ``"model_ema"`` with ``use_ema``, or ``"state_dict"``, or the file
itself); tells Vim from VMamba by their keys; converts the released VMamba layout (stacked per-direction
``x_proj_weight`` / ``dt_projs_weight`` / ``dt_projs_bias``, ``classifier.norm`` / ``classifier.head``) into vmq_fx's;
infers the configuration from the tensor shapes when none is named, preferring a named one; and loads with strict key
and shape checks. Every refusal names the file and the keys that decided it, as the file names them.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import math
import os
import pickletools
import re
import zipfile
from typing import Mapping

import torch
from torch import Tensor, nn

from vmq_fx.models.registry import MODEL_CONFIGS, build_model, with_overrides
from vmq_fx.models.vim import VimConfig
from vmq_fx.models.vmamba import VMambaConfig

__all__ = ["CheckpointMismatchError", "infer_config", "load_checkpoint", "load_state_dict_strict", "read_state_dict"]

log = logging.getLogger(__name__)

_SHOWN = 10


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into, or cannot be told apart. The message's
    indented lines list the keys; the CLI prints them all."""

    cli_detail = True


def _preview(keys) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint",
                           file_names: "_FileNames | None" = None) -> None:
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key raises an error listing up to ten
    of each (named as in the file where the loader renamed or split them: ``file_names``)."""
    own = model.state_dict()
    name = file_names.name if file_names is not None else (lambda key: key)
    missing = sorted({name(k) for k in set(own) - set(state_dict)})
    unexpected = sorted({name(k) for k in set(state_dict) - set(own)})
    shapes = {}
    for k in sorted(set(own) & set(state_dict)):
        if tuple(state_dict[k].shape) != tuple(own[k].shape) and name(k) not in shapes:
            in_file = file_names.tensors.get(name(k)) if file_names is not None else None
            theirs, ours = tuple(state_dict[k].shape), tuple(own[k].shape)
            if in_file is not None and in_file.dim() == state_dict[k].dim() + 1:  # stacked in the file
                theirs = tuple(in_file.shape)
                ours = (sum(name(j) == name(k) for j in own), *ours)
            shapes[name(k)] = f"{name(k)}: checkpoint {theirs} vs model {ours}"
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}):")
            lines += [f"    {line}" for line in list(shapes.values())[:_SHOWN]]
            lines += [f"    ... (+{len(shapes) - _SHOWN} more)"] if len(shapes) > _SHOWN else []
        if len(missing) > len(own) // 2:
            lines.append("  (most keys differ: is this a checkpoint of another architecture or configuration?)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


# -- reading -----------------------------------------------------------------------------------------------------------
class _YacsNodeAsDict:
    """Stands in for ``yacs.config.CfgNode`` (the ``config`` entry of VMamba's training checkpoints) while
    unpickling: each node becomes a plain ``OrderedDict`` (the unpickler fills only exact dict types), so yacs is
    neither needed nor run."""

    def __new__(cls, *args):
        return collections.OrderedDict()


# What torch's weights-only unpickler may build besides tensors and containers: the training scripts' metadata.
_ALLOWED_GLOBALS = [argparse.Namespace, (_YacsNodeAsDict, "yacs.config.CfgNode")]
_ALLOWED_TEXT = "tensors, containers, argparse.Namespace and yacs CfgNode"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch.save(..., _use_new_zipfile_serialization=False)


def _pickle_globals(path: str) -> tuple[bool, list[str]]:
    """Whether the pickle stream at the start of ``path`` is torch's legacy header, and the globals the stream would
    import. Read with :mod:`pickletools` (opcodes only: nothing is imported or run)."""
    names, strings = [], []
    with open(path, "rb") as f:
        for opcode, arg, _ in pickletools.genops(f):
            if opcode.name in ("LONG1", "LONG4") and arg == _TORCH_LEGACY_MAGIC and not names:
                return True, []
            if opcode.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    return False, sorted(set(names))


def _check_container(path: str) -> None:
    """Refuse, in one line, a file that is not a complete torch checkpoint, before torch tries to read it."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = os.path.getsize(path)
    if head.startswith(b"PK"):  # torch.save's zip archive: its directory is at the end of the file
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is cut short or damaged ({size} bytes, and the zip archive torch.save writes has "
                             "no directory at its end): copy or download it again")
        return
    if not head.startswith(b"\x80"):
        raise ValueError(f"{path} is neither a torch checkpoint nor safetensors (it begins with {head!r})")
    try:
        legacy, names = _pickle_globals(path)
    except ValueError as e:  # pickletools: the stream ends before its STOP opcode
        raise ValueError(f"{path} is cut short or damaged ({size} bytes; {e}): copy or download it again") from None
    if not legacy:
        raise ValueError(
            f"{path} is a plain Python pickle, not a torch.save file; unpickling it could run code"
            + (f" (it imports {', '.join(names[:5])})" if names else "")
            + ", so it is not read: where you trust it, save its tensors with torch.save or safetensors")


def _torch_load(path: str):
    _check_container(path)
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a global outside the allow-list, or damage inside the archive
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise ValueError(f"{path}: holds a pickled {unsafe.group(1)} object, which is not loaded (only "
                             f"{_ALLOWED_TEXT} are): save the state dict alone "
                             "(torch.save({'model': model.state_dict()}, path))") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} could not be read as a torch checkpoint ({reason[:200]}): it may be damaged; copy or "
                         "download it again") from None


@dataclasses.dataclass(frozen=True)
class _Weights:
    """A checkpoint's model state dict, the entry it came from (``None``: the file is the state dict) and the file's
    other entries."""

    state: dict[str, Tensor]
    entry: str | None
    others: tuple[str, ...]

    def describe(self) -> str:
        where = f"weights from {self.entry!r}" if self.entry else "a bare state dict"
        return where + (f" (the file also holds {_preview(self.others)})" if self.others else "")


def _read_weights(path: str, use_ema: bool) -> _Weights:
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
    others = tuple(sorted(str(k) for k in blob if k != key)) if key is not None else ()
    return _Weights(dict(state), key, others)


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """The model state dict inside a checkpoint file.

    Args:
        path: ``.safetensors``, or a torch file: a state dict, or a dict holding one under ``"model"`` (Vim /
            VMamba training scripts), ``"model_ema"`` or ``"state_dict"``. Only tensors, containers and the training
            scripts' ``argparse.Namespace`` / yacs ``CfgNode`` are unpickled (the latter as a plain dict, without
            yacs); plain Python pickles are refused unread.
        use_ema: take ``"model_ema"`` (the exponential moving average the training scripts keep) instead of
            ``"model"``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, cut short, unsafe to unpickle, or no state dict where one was expected (the keys
            found are named).
    """
    return _read_weights(os.fspath(path), use_ema).state


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


@dataclasses.dataclass(frozen=True)
class _FileNames:
    """How the keys of a converted state dict are named in the file: ``origin`` for the keys the file held, the
    released layout's rules (where the file uses it) for keys it lacks; ``tensors`` are the file's own."""

    origin: Mapping[str, str]
    released: bool
    tensors: Mapping[str, Tensor]

    def name(self, key: str) -> str:
        if key in self.origin:
            return self.origin[key]
        if not self.released:
            return key
        stacked = re.fullmatch(r"(.*)\.(x_proj|dt_proj)\.\d+\.(weight|bias)", key)
        if stacked:
            stem, kind, leaf = stacked.groups()
            return f"{stem}.x_proj_weight" if kind == "x_proj" else f"{stem}.dt_projs_{leaf}"
        return "classifier." + key if key.split(".")[0] in ("norm", "head") else key


def _vmamba_to_vmq(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], _FileNames]:
    """The released VMamba layout -> vmq_fx's: split the stacked per-direction projections, rename the classifier;
    and where each key came from."""
    out, origin = {}, {}

    def put(new: str, value: Tensor, old: str) -> None:
        out[new] = value
        if new != old:
            origin[new] = old

    for key, value in state.items():
        stem, _, name = key.rpartition(".")
        if name == "x_proj_weight":
            for k in range(value.shape[0]):
                put(f"{stem}.x_proj.{k}.weight", value[k], key)
        elif name in ("dt_projs_weight", "dt_projs_bias"):
            for k in range(value.shape[0]):
                put(f"{stem}.dt_proj.{k}.{name.rpartition('_')[2]}", value[k], key)
        elif key.startswith("classifier."):
            put(key[len("classifier."):], value, key)
        elif re.fullmatch(r".*\.(in_proj|out_proj|fc1|fc2)\.weight", key) and value.dim() == 4:
            put(key, value.flatten(1), key)  # Linear2d of the channel-first models, stored as a 1x1 convolution
        else:
            put(key, value, key)
    if "patch_embed.0.weight" in out and "patch_embed.5.weight" not in out:  # first-generation patch embedding
        for part, new in (("0", "patch_embed"), ("2", "patch_norm")):
            for p in ("weight", "bias"):
                if f"patch_embed.{part}.{p}" in out:
                    put(f"{new}.{p}", out.pop(f"patch_embed.{part}.{p}"), f"patch_embed.{part}.{p}")
    released = any(k.endswith("x_proj_weight") or k.startswith("classifier.") for k in state)
    return out, _FileNames(origin, released, state)


def _need(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"{source}: cannot infer the configuration without {key}")
    return state[key]


def _infer_vim(state: Mapping[str, Tensor], source: str, img_size: int | None = None,
               stride: int | None = None) -> VimConfig:
    """Vim's shape from its tensors. The position embedding fixes the patch grid but not the stride: a grid of ``G``
    patches of ``P`` pixels fits ``img_size = (G - 1) * stride + P`` for any stride. ``img_size`` or ``stride``
    decides; without either the stride is the patch size."""
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
    if img_size is not None and stride is None:
        stride = patch if grid == 1 else (img_size - patch) // (grid - 1)
    stride = stride or patch
    fits = (grid - 1) * stride + patch
    if img_size is not None and img_size != fits:
        raise CheckpointMismatchError(
            f"{source}: {grid}x{grid} patches of {patch} pixels (pos_embed: {tokens} positions) do not tile "
            f"img_size {img_size} with stride {stride}; they tile {fits} with that stride")
    return VimConfig(img_size=fits, patch_size=patch, stride=None if stride == patch else stride, in_chans=in_chans,
                     embed_dim=dim, depth=depth, d_state=d_state, num_classes=_need(state, "head.weight", source).shape[0])


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


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint", **geometry) -> VimConfig | VMambaConfig:
    """The configuration a (vmq_fx-layout) state dict was trained with, from its keys and shapes; a Vim's
    ``img_size`` / ``stride`` (which its tensors do not fix) may be given."""
    if _family(state, source) == "vim":
        return _infer_vim(state, source, **geometry)
    return _infer_vmamba(state, source)


def _architecture(cfg, geometry: bool = True) -> dict:
    """``cfg``'s fields without its preprocessing and training-only ones (and, with ``geometry=False``, without a
    Vim's image size and stride, which its tensors do not fix: its patch grid instead)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("drop_path_rate", "preprocess")}
    if isinstance(cfg, VimConfig):
        fields["stride"] = cfg.stride or cfg.patch_size
        if not geometry:
            del fields["img_size"], fields["stride"]
            fields["grid"] = cfg.grid
    return fields


def _named_fits(cfg, geometry: bool) -> list[str]:
    """The named configurations of ``cfg``'s architecture: the same tensors, and, with ``geometry``, the same input
    size and stride."""
    return [name for name, c in MODEL_CONFIGS.items()
            if type(c) is type(cfg) and _architecture(c, geometry) == _architecture(cfg, geometry)]


def _geometry(cfg) -> str:
    return f"{cfg.img_size}x{cfg.img_size}, stride {cfg.stride or cfg.patch_size}"


def _inferred(state: Mapping[str, Tensor], source: str, family: str,
              overrides: dict) -> tuple[VimConfig | VMambaConfig, str]:
    """The configuration of a checkpoint without a named one, and how it was chosen (for the log). Among named
    configurations with the same tensors the released one is taken, and the log says what else would fit; two
    named candidates are refused."""
    if family == "vmamba":
        if "stride" in overrides:
            raise CheckpointMismatchError(f"{source}: stride is a Vim setting; this is a VMamba checkpoint")
        cfg, geometry = _infer_vmamba(state, source), {}
    else:
        geometry = {k: overrides.pop(k) for k in ("img_size", "stride") if k in overrides}
        cfg = _infer_vim(state, source, **geometry)
    if family == "vmamba" or geometry:
        names = _named_fits(cfg, geometry=True)
        if names:
            return dataclasses.replace(MODEL_CONFIGS[names[0]], drop_path_rate=0.0), f"the {names[0]} configuration"
        return cfg, f"inferred configuration {cfg}"
    names = _named_fits(cfg, geometry=False)
    if len(names) > 1:
        raise CheckpointMismatchError(
            f"{source}: its tensors fit several configurations ("
            + "; ".join(f"{n}: {_geometry(MODEL_CONFIGS[n])}" for n in names)
            + "): name one (config=, --config) or give img_size / stride")
    if names:
        named = dataclasses.replace(MODEL_CONFIGS[names[0]], drop_path_rate=0.0)
        how = f"the {names[0]} configuration ({_geometry(named)})"
        if _architecture(named) != _architecture(cfg):
            how += (f"; the same tensors would also fit {_geometry(cfg)}: give img_size / stride (--img-size / "
                    "--stride) for that")
        return named, how
    return cfg, (f"inferred configuration {cfg} (the file does not fix the stride: stride = patch size assumed; "
                 "give img_size / stride (--img-size / --stride) for another)")


def load_checkpoint(path: str | os.PathLike, config: str | VimConfig | VMambaConfig | None = None,
                    use_ema: bool = False, **overrides) -> nn.Module:
    """A Vim or VMamba model from a checkpoint file, in eval mode.

    One log line (``logging.INFO``) says which configuration was taken, which weights, and what else the file held.

    Args:
        path: official Vim (hustvl/Vim) or VMamba (MzeroMiko/VMamba v2 / v2v) checkpoints as released or as their
            training scripts write them (with ``args`` or a yacs ``config``, ``optimizer``, ``model_ema`` ...), or a
            state dict saved from a vmq_fx model (``.pth`` or ``.safetensors``).
        config: a configuration name (``vim_tiny``, ``vim_tiny_stride8``, ``vmambav2v_tiny``, ... see ``vmq list``)
            or object; ``None`` infers it from the tensor shapes, preferring a named configuration (a Vim's tensors
            fix its patch grid but not its stride: ``vim_tiny_stride8`` at 224 and a stride-16 Vim-T at 432 have the
            same tensors).
        use_ema: load the ``model_ema`` weights.
        **overrides: configuration fields to change (e.g. ``img_size`` for a VMamba, which has no position
            embedding; ``img_size`` / ``stride`` for a Vim whose stride is not the one inferred; ``preprocess``).

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
    weights = _read_weights(source, use_ema)
    state, file_names, overrides = weights.state, None, dict(overrides)
    if config is None:
        family = _family(state, source)
        if family == "vmamba":
            state, file_names = _vmamba_to_vmq(state)
        cfg, how = _inferred(state, source, family, overrides)
    else:
        cfg = MODEL_CONFIGS[config] if isinstance(config, str) else config
        how = f"the {config} configuration" if isinstance(config, str) else f"configuration {cfg}"
        try:
            family = _family(state, source)
        except CheckpointMismatchError:  # the configuration named decides; the key lists below say what differs
            family = "vim" if isinstance(cfg, VimConfig) else "vmamba"
        if (family == "vim") != isinstance(cfg, VimConfig):
            raise CheckpointMismatchError(f"{source} is a {'Vim' if family == 'vim' else 'VMamba'} checkpoint, but "
                                          f"the configuration given is a {type(cfg).__name__}")
        if family == "vmamba":
            state, file_names = _vmamba_to_vmq(state)
    model = build_model(with_overrides(cfg, **overrides))
    load_state_dict_strict(model, state, source=source, file_names=file_names)
    log.info("%s: %s; %s", source, how + (f" with {overrides}" if overrides else ""), weights.describe())
    return model.eval()
