"""Named model configurations and construction."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from vmq_fx.models.preprocess import FASHION_MNIST
from vmq_fx.models.vim import VimConfig, VisionMamba
from vmq_fx.models.vmamba import VMamba, VMambaConfig

__all__ = ["MODEL_CONFIGS", "build_model", "create_model", "list_models", "with_overrides"]


def _vmamba_v2(dim: int, depths: tuple[int, ...], ssm_ratio: float) -> VMambaConfig:
    return VMambaConfig(dims=tuple(dim * 2**i for i in range(4)), depths=depths, d_state=1, ssm_ratio=ssm_ratio,
                        mlp_ratio=4.0, gate=False, patch_embed="v2", downsample="v3", conv_bias=False)


MODEL_CONFIGS: dict[str, VimConfig | VMambaConfig] = {
    # The published Vim shapes (ImageNet, 224x224, patch 16, 197 tokens).
    "vim_tiny": VimConfig(embed_dim=192, depth=24),
    "vim_small": VimConfig(embed_dim=384, depth=24),
    "vim_base": VimConfig(embed_dim=768, depth=24),
    # The official *_patch16_stride8_224 models (overlapping patches: 27x27 + 1 = 730 tokens), which its fine-tuning
    # scripts train. Their tensors equal a stride-16 model's at 432x432: loading prefers these names.
    "vim_tiny_stride8": VimConfig(embed_dim=192, depth=24, stride=8),
    "vim_small_stride8": VimConfig(embed_dim=384, depth=24, stride=8),
    # 28x28 single-channel (Fashion-MNIST): 4x4 patches of 7 pixels + class token = 17 tokens.
    "vim_fm_tiny": VimConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=8, num_classes=10,
                             preprocess=FASHION_MNIST),
    # Vim's sequence at 224x224 on 28x28: 2x2 patches, 196 patches + the middle class token = 197 tokens (index 98).
    "vim_fm_197": VimConfig(img_size=28, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_classes=10,
                            preprocess=FASHION_MNIST),
    # Vim-T's width and depth on 28x28 with 4-pixel patches (50 tokens): a GPU-sized reference.
    "vim_fm_small": VimConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=24, num_classes=10,
                              preprocess=FASHION_MNIST),
    # The released VMamba v2 / v2v models (MzeroMiko/VMamba configs vmambav2_*_224 / vmambav2v_*_224: d_state 1,
    # patch embedding v2, downsampling v3, depthwise convolution without bias, no z gate), 224x224.
    **{f"vmambav2_{size}": _vmamba_v2(dim, depths, ssm_ratio=2.0) for size, dim, depths in (
        ("tiny", 96, (2, 2, 5, 2)), ("small", 96, (2, 2, 15, 2)), ("base", 128, (2, 2, 15, 2)))},
    **{f"vmambav2v_{size}": _vmamba_v2(dim, depths, ssm_ratio=1.0) for size, dim, depths in (
        ("tiny", 96, (2, 2, 8, 2)), ("small", 96, (2, 2, 20, 2)), ("base", 128, (2, 2, 20, 2)))},
    # 28x28 single-channel: 7x7 tokens of 4 pixels, then 4x4 after merging.
    "vmamba_fm_tiny": VMambaConfig(
        img_size=28, patch_size=4, in_chans=1, dims=(48, 96), depths=(2, 4), d_state=8, ssm_ratio=2.0,
        mlp_ratio=2.0, gate=True, num_classes=10, preprocess=FASHION_MNIST,
    ),
}

_BUILDERS: dict[type, Callable[..., nn.Module]] = {VimConfig: VisionMamba, VMambaConfig: VMamba}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_CONFIGS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a randomly initialized model from a named configuration.

    Args:
        name: one of :func:`list_models`.
        **overrides: config fields to change, e.g. ``num_classes=10`` or ``drop_path_rate=0.1``.

    Example:
        >>> from vmq_fx.models import create_model
        >>> create_model("vim_fm_tiny").config.num_tokens
        17
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return build_model(with_overrides(MODEL_CONFIGS[name], **overrides))


def with_overrides(cfg: VimConfig | VMambaConfig, **overrides) -> VimConfig | VMambaConfig:
    """``cfg`` with some fields changed. A new ``img_size`` keeps the preprocessing's statistics at the new size; a
    new ``in_chans`` takes the default preprocessing for that many channels (unless ``preprocess`` is given).

    Example:
        >>> from vmq_fx.models import MODEL_CONFIGS
        >>> with_overrides(MODEL_CONFIGS["vim_fm_tiny"], img_size=56).preprocess.input_size
        56
    """
    fields = set(type(cfg).__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
    if "preprocess" not in overrides and overrides.get("in_chans", cfg.in_chans) != cfg.in_chans:
        overrides["preprocess"] = None
    elif "preprocess" not in overrides and overrides.get("img_size", cfg.img_size) != cfg.img_size:
        overrides["preprocess"] = dataclasses.replace(cfg.preprocess, input_size=overrides["img_size"])
    return dataclasses.replace(cfg, **overrides)


def build_model(cfg: VimConfig | VMambaConfig) -> nn.Module:
    """The model for a configuration object (randomly initialized)."""
    if type(cfg) not in _BUILDERS:
        raise TypeError(f"build_model: expected a VimConfig or VMambaConfig, got {type(cfg).__name__}")
    return _BUILDERS[type(cfg)](cfg)
