"""Reference models trained on Fashion-MNIST and shipped with the package (safetensors + JSON model card)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from vmq_fx.models.checkpoint import load_state_dict_strict
from vmq_fx.models.registry import create_model

__all__ = ["REFERENCE_DIR", "list_references", "load_reference", "reference_card"]

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def list_references() -> list[str]:
    """Names of the shipped reference models."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))


def reference_card(name: str) -> dict:
    """The JSON model card of a shipped reference model (config, test accuracy, training command, versions)."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_references()) or "none"
        raise ValueError(f"unknown reference model {name!r}; shipped: {known}")
    return json.loads(path.read_text())


def load_reference(name: str) -> nn.Module:
    """Load a shipped reference model (offline) in eval mode.

    Args:
        name: e.g. ``"vim-fm-tiny"`` or ``"vmamba-fm-tiny"`` (see :func:`list_references`).

    Example:
        >>> from vmq_fx.models import load_reference
        >>> model = load_reference("vim-fm-tiny")
        >>> model.config.depth
        8
    """
    card = reference_card(name)
    weights = REFERENCE_DIR / f"{name}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"reference model {name!r}: weights file {weights} is missing")
    model = create_model(card["model"], **{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in card["config"].items()})
    load_state_dict_strict(model, load_file(str(weights)), source=str(weights))
    return model.eval()
