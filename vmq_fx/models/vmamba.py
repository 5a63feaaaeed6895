"""VMamba (Liu et al., 2024): VSS blocks with the 2D selective scan (SS2D).

SS2D: ``in_proj`` -> depthwise conv2d -> SiLU -> cross-scan in 4 directions (row-major, column-major and both
reversed) -> per-direction ``x_proj``/``dt_proj`` -> one grouped selective scan over the 4 directions
(B and C as [batch, 4, N, L]) -> cross-merge -> LayerNorm ``out_norm`` -> optional SiLU(z) gate -> ``out_proj``.
Stages of VSS blocks (SS2D + MLP) are joined by patch merging.

Both generations of the MzeroMiko/VMamba code are covered: the first (patch embedding by one strided convolution,
patch merging by 2x2 concatenation) and the released v2 / v2v models (``patch_embed="v2"``: two 3x3 stride-2
convolutions with LayerNorm and GELU between; ``downsample="v3"``: a 3x3 stride-2 convolution and LayerNorm;
depthwise convolution without bias; ``d_state`` 1; no z gate, the ``v05_noz`` forward type).

Differences from that code, chosen for quantization: the per-direction projections are four ``nn.Linear`` modules
(``x_proj.{k}``, ``dt_proj.{k}``) instead of the stacked ``x_proj_weight`` / ``dt_projs_weight`` / ``dt_projs_bias``
parameters, so that each is its own linear node on a [batch, L, channels] tensor (:func:`vmq_fx.models.load_checkpoint`
splits the stacked ones); tokens stay as [batch, L, channels] between layers; the classifier's norm and head are
``norm`` and ``head`` (the released checkpoints' ``classifier.norm`` / ``classifier.head``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq_fx.models.layers import DropPath, check_image_shape
from vmq_fx.models.mamba import init_a_log, init_dt_bias
from vmq_fx.models.preprocess import Preprocess, default_preprocess
from vmq_fx.ops import selective_scan_fn

__all__ = ["VMambaConfig", "VMamba", "SS2D", "VSSBlock"]

_DIRECTIONS = 4


@dataclass(frozen=True)
class VMambaConfig:
    """Shape of a VMamba model.

    Args:
        img_size: square input resolution.
        patch_size: patch embedding kernel and stride.
        in_chans: image channels.
        dims: channels of each stage.
        depths: VSS blocks in each stage.
        d_state: SSM state size.
        ssm_ratio: ``d_inner = ssm_ratio * dim``.
        mlp_ratio: MLP hidden width per channel; 0 disables the MLP.
        gate: multiply the scan output by SiLU(z) (``in_proj`` then produces x and z).
        num_classes: classifier outputs.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        patch_embed: ``"v1"`` (one ``patch_size`` strided convolution + LayerNorm) or ``"v2"`` (two 3x3 stride-2
            convolutions, LayerNorm and GELU between, LayerNorm after; ``patch_size`` 4).
        downsample: ``"v1"`` (patch merging: 2x2 concatenation, LayerNorm, linear) or ``"v3"`` (3x3 stride-2
            convolution + LayerNorm).
        d_conv: kernel of the depthwise convolution in SS2D.
        conv_bias: bias on that convolution.
        dt_rank: rank of the delta projection (``None``: ``ceil(dim / 16)``).
        preprocess: how input images are prepared (default: the ImageNet evaluation transform at ``img_size``).
    """

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 5, 2)
    d_state: int = 1
    ssm_ratio: float = 1.0
    mlp_ratio: float = 4.0
    gate: bool = False
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    patch_embed: str = "v1"
    downsample: str = "v1"
    d_conv: int = 3
    conv_bias: bool = True
    dt_rank: int | None = None
    preprocess: Preprocess | None = None

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "preprocess", default_preprocess(self.preprocess, self.img_size, self.in_chans))
        if self.patch_embed not in ("v1", "v2") or self.downsample not in ("v1", "v3"):
            raise ValueError(f"VMambaConfig: patch_embed must be v1 or v2 and downsample v1 or v3, got "
                             f"{self.patch_embed!r} / {self.downsample!r}")
        if self.patch_embed == "v2" and self.patch_size != 4:
            raise ValueError("VMambaConfig: patch_embed v2 (two stride-2 convolutions) has patch_size 4")
        if self.d_conv < 1 or (self.dt_rank is not None and self.dt_rank < 1):
            raise ValueError(f"VMambaConfig: d_conv and dt_rank must be positive, got {self.d_conv}, {self.dt_rank}")
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"VMambaConfig: dims {self.dims} and depths {self.depths} must have the same length")
        if min(self.dims) < 1 or min(self.depths) < 1 or self.d_state < 1 or self.ssm_ratio <= 0:
            raise ValueError(f"VMambaConfig: sizes must be positive, got {self}")
        if self.img_size % self.patch_size:
            raise ValueError(f"VMambaConfig: patch_size={self.patch_size} does not divide img_size={self.img_size}")
        if self.mlp_ratio < 0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VMambaConfig: invalid mlp_ratio or drop_path_rate in {self}")

    def resolutions(self) -> list[int]:
        """Side of the token grid in each stage (patch merging pads odd sides; the v3 convolution rounds up too)."""
        side = self.img_size // self.patch_size if self.patch_embed == "v1" else math.ceil(self.img_size / 4)
        out = []
        for _ in self.dims:
            out.append(side)
            side = math.ceil(side / 2)
        return out


def cross_scan(x: Tensor) -> Tensor:
    """[batch, D, H, W] -> [batch, 4, D, H*W]: row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`cross_scan` summed over directions: [batch, 4, D, L] -> [batch, D, L]."""
    b, _, d, length = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    return rows + cols.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)


class SS2D(nn.Module):
    """2D selective scan over a [batch, H*W, dim] token grid."""

    def __init__(self, dim: int, side: int, d_state: int, ssm_ratio: float, gate: bool, d_conv: int = 3,
                 dt_rank: int | str = "auto", conv_bias: bool = True):
        super().__init__()
        self.side = side
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.gate = gate
        self.in_proj = nn.Linear(dim, self.d_inner * (2 if gate else 1), bias=False)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner,
                                bias=conv_bias)
        self.x_proj = nn.ModuleList(
            nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False) for _ in range(_DIRECTIONS)
        )
        self.dt_proj = nn.ModuleList(nn.Linear(self.dt_rank, self.d_inner) for _ in range(_DIRECTIONS))
        for proj in self.dt_proj:
            std = self.dt_rank**-0.5
            nn.init.uniform_(proj.weight, -std, std)
            init_dt_bias(proj, 0.001, 0.1, 1e-4)
        self.A_logs = init_a_log(_DIRECTIONS * self.d_inner, d_state)
        self.Ds = nn.Parameter(torch.ones(_DIRECTIONS * self.d_inner))
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, H*W, dim] -> [batch, H*W, dim]."""
        b, length, _ = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)
        x = x.transpose(1, 2).reshape(b, self.d_inner, self.side, self.side)
        xs = cross_scan(F.silu(self.conv2d(x)))  # [batch, 4, d_inner, L]
        dts, bs, cs = [], [], []
        for k in range(_DIRECTIONS):
            x_dbl = self.x_proj[k](xs[:, k].transpose(1, 2))  # [batch, L, dt_rank + 2N]
            dt, b_k, c_k = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
            dts.append(F.linear(dt, self.dt_proj[k].weight).transpose(1, 2))
            bs.append(b_k.transpose(1, 2))
            cs.append(c_k.transpose(1, 2))
        y = selective_scan_fn(
            xs.reshape(b, _DIRECTIONS * self.d_inner, length),
            torch.cat(dts, dim=1),
            -torch.exp(self.A_logs.float()),
            torch.stack(bs, dim=1),
            torch.stack(cs, dim=1),
            self.Ds.float(),
            delta_bias=torch.cat([p.bias for p in self.dt_proj]).float(),
            delta_softplus=True,
        )
        y = cross_merge(y.reshape(b, _DIRECTIONS, self.d_inner, length), self.side, self.side)
        y = self.out_norm(y.transpose(1, 2))
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """``x += SS2D(LayerNorm(x)); x += MLP(LayerNorm(x))``."""

    def __init__(self, dim: int, side: int, cfg: VMambaConfig, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, side, cfg.d_state, cfg.ssm_ratio, cfg.gate, d_conv=cfg.d_conv,
                       dt_rank=cfg.dt_rank or "auto", conv_bias=cfg.conv_bias)
        self.drop_path = DropPath(drop_path)
        self.mlp = None
        if cfg.mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class _PatchMerging(nn.Module):
    """[batch, H*W, C] -> [batch, ceil(H/2)*ceil(W/2), out]: 2x2 neighbours concatenated, LayerNorm, linear."""

    def __init__(self, dim: int, out_dim: int, side: int):
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.side, self.side, c)
        if self.side % 2:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2)))


class _ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [batch, C, H, W] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PatchEmbedV2(nn.Sequential):
    """[batch, C, H, W] -> [batch, H/4*W/4, dim]: conv 3x3/2, LayerNorm, GELU, conv 3x3/2, LayerNorm. The indices of
    the released models' ``patch_embed`` (0, 2, 5, 7; the permutes of the original are identities here)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.Identity(), _ChannelsLastNorm(dim // 2),
            nn.Identity(), nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.Identity(),
            nn.LayerNorm(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self[4](self[2](self[0](x)))
        return self[7](self[5](x).flatten(2).transpose(1, 2))


class _DownsampleV3(nn.Sequential):
    """[batch, side*side, C] -> [batch, ceil(side/2)^2, out]: conv 3x3/2 + LayerNorm (the released models'
    ``downsample.1`` and ``downsample.3``)."""

    def __init__(self, dim: int, out_dim: int, side: int):
        super().__init__(nn.Identity(), nn.Conv2d(dim, out_dim, 3, stride=2, padding=1), nn.Identity(),
                         nn.LayerNorm(out_dim))
        self.side = side

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = self[1](x.transpose(1, 2).reshape(b, c, self.side, self.side))
        return self[3](x.flatten(2).transpose(1, 2))


class _Stage(nn.Module):
    def __init__(self, blocks: list[VSSBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class VMamba(nn.Module):
    """VMamba classifier.

    Example:
        >>> import torch
        >>> from vmq_fx.models import create_model
        >>> model = create_model("vmamba_fm_tiny").eval()
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: VMambaConfig):
        super().__init__()
        self.config = cfg
        if cfg.patch_embed == "v1":
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.patch_size, stride=cfg.patch_size)
            self.patch_norm = nn.LayerNorm(cfg.dims[0])
        else:
            self.patch_embed = _PatchEmbedV2(cfg.in_chans, cfg.dims[0])
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        sides = cfg.resolutions()
        stages, i = [], 0
        for s, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            blocks = [VSSBlock(dim, sides[s], cfg, rates[i + j]) for j in range(depth)]
            i += depth
            down = None
            if s + 1 < len(cfg.dims):
                make = _PatchMerging if cfg.downsample == "v1" else _DownsampleV3
                down = make(dim, cfg.dims[s + 1], sides[s])
            stages.append(_Stage(blocks, down))
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(cfg.dims[-1])
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, in_chans, img_size, img_size] -> logits [batch, num_classes]."""
        cfg = self.config
        check_image_shape(x, cfg.in_chans, cfg.img_size, "VMamba")
        if cfg.patch_embed == "v1":
            x = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        else:
            x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.head(self.norm(x).mean(dim=1))
