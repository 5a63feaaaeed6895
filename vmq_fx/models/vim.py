"""Vision Mamba (Vim; Zhu et al., 2024) with the bidirectional "v2" mixer and a middle class token.

Mirrors ``VisionMamba`` of the hustvl/Vim code for the published configurations
(``vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``): patch embedding, learned absolute
position embedding, class token inserted in the middle of the sequence, pre-norm RMSNorm blocks with the residual
kept in float32, a final RMSNorm and a linear head on the class token. State-dict keys match the official
checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vmq_fx.models.layers import DropPath, check_image_shape
from vmq_fx.models.mamba import MambaMixer, RMSNorm
from vmq_fx.models.preprocess import Preprocess, default_preprocess

__all__ = ["VimConfig", "VisionMamba", "VimBlock"]


@dataclass(frozen=True)
class VimConfig:
    """Shape of a Vim model.

    Args:
        img_size: square input resolution.
        patch_size: patch embedding kernel.
        stride: patch embedding stride (Vim allows overlapping patches); defaults to ``patch_size``.
        in_chans: image channels.
        embed_dim: residual stream width.
        depth: number of Mamba blocks.
        d_state: SSM state size.
        num_classes: classifier outputs.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        preprocess: how input images are prepared (default: the ImageNet evaluation transform at ``img_size``).
    """

    img_size: int = 224
    patch_size: int = 16
    stride: int | None = None
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    preprocess: Preprocess | None = None

    def __post_init__(self):
        object.__setattr__(self, "preprocess", default_preprocess(self.preprocess, self.img_size, self.in_chans))
        stride = self.stride or self.patch_size
        if min(self.img_size, self.patch_size, stride, self.in_chans, self.embed_dim, self.depth, self.d_state,
               self.num_classes) < 1:
            raise ValueError(f"VimConfig: all sizes must be positive, got {self}")
        if self.patch_size > self.img_size or (self.img_size - self.patch_size) % stride:
            raise ValueError(
                f"VimConfig: patch_size={self.patch_size} with stride={stride} does not tile img_size={self.img_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VimConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid(self) -> int:
        return (self.img_size - self.patch_size) // (self.stride or self.patch_size) + 1

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the mixers: patches plus the class token."""
        return self.grid**2 + 1


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.stride or cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VimBlock(nn.Module):
    """Pre-norm residual block: ``residual += hidden; hidden = mixer(norm(residual))``."""

    def __init__(self, dim: int, d_state: int, drop_path: float):
        super().__init__()
        self.mixer = MambaMixer(dim, d_state=d_state, bimamba=True, divide_out=True)
        self.norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        return self.mixer(hidden_states), residual.float()


class VisionMamba(nn.Module):
    """Vim classifier.

    Example:
        >>> import torch
        >>> from vmq_fx.models import create_model
        >>> model = create_model("vim_fm_tiny").eval()
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(VimBlock(d, cfg.d_state, r) for r in rates)
        self.norm_f = RMSNorm(d)
        self.drop_path = DropPath(rates[-1])
        self.head = nn.Linear(d, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Vim / mamba-ssm initialization: small normal embeddings, zero linear biases (except dt_proj's),
        # out_proj rescaled by 1/sqrt(depth) (GPT-2 style, one residual write per block).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            with torch.no_grad():
                mixer.out_proj.weight /= self.config.depth**0.5

    @property
    def token_position(self) -> int:
        return self.config.grid**2 // 2

    def forward_features(self, x: Tensor) -> Tensor:
        cfg = self.config
        check_image_shape(x, cfg.in_chans, cfg.img_size, "VisionMamba")
        x = self.patch_embed(x)
        pos = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((x[:, :pos], cls, x[:, pos:]), dim=1) + self.pos_embed
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))[:, pos]

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, in_chans, img_size, img_size] -> logits [batch, num_classes]."""
        return self.head(self.forward_features(x))
