"""Loading state dicts with strict, readable key and shape checks."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

from vmq_fx.models.registry import create_model

__all__ = ["CheckpointMismatchError", "load_state_dict_strict", "load_vim_checkpoint"]

_SHOWN = 8


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def _preview(keys: list[str]) -> str:
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


def load_vim_checkpoint(path: str | os.PathLike, config: str = "vim_tiny", **overrides) -> nn.Module:
    """Load an official-format Vim checkpoint (``torch.load(path)["model"]``) into a :class:`VisionMamba`.

    Args:
        path: a ``.pth`` file as released by hustvl/Vim.
        config: the named configuration the checkpoint was trained with (``vim_tiny``, ``vim_small``, ...).
        **overrides: config fields to change (e.g. ``num_classes``).

    Returns:
        The model in eval mode.

    Example:
        >>> import torch, tempfile, os
        >>> from vmq_fx.models import create_model, load_vim_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "vim.pth")
        >>> torch.save({"model": create_model("vim_fm_tiny").state_dict()}, path)
        >>> load_vim_checkpoint(path, "vim_fm_tiny").config.depth
        8
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Vim checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable or not a torch file: name the file, keep the cause
        raise ValueError(f"could not read {path} as a torch checkpoint: {e}") from e
    if not isinstance(blob, Mapping) or "model" not in blob or not isinstance(blob["model"], Mapping):
        found = sorted(blob)[:_SHOWN] if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointMismatchError(
            f"{path}: expected an official Vim checkpoint, a dict with a 'model' state dict; found {found}"
        )
    model = create_model(config, **overrides)
    load_state_dict_strict(model, blob["model"], source=path)
    return model.eval()
