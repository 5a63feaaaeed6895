"""Mamba mixers built on ``vmq::selective_scan``, with the parameter names of mamba-ssm and Vim.

Every projection is an ``nn.Linear`` called on a [batch, L, channels] tensor, so that after ``torch.export`` each one
is an ``aten.linear`` node whose input has the token axis at dimension 1 (what per-token quantization annotates).
``dt_proj`` is applied without its bias, which enters the scan as ``delta_bias`` as in mamba-ssm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq_fx.ops import causal_conv1d_fn, selective_scan_fn

__all__ = ["MambaMixer", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm with a weight only, as ``mamba_ssm.ops.triton.layer_norm.RMSNorm``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def init_dt_bias(dt_proj: nn.Linear, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    # mamba-ssm's initialization: dt = softplus(bias) log-uniform in [dt_min, dt_max].
    d = dt_proj.out_features
    dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def init_a_log(d_inner: int, d_state: int) -> nn.Parameter:
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    return nn.Parameter(torch.log(a))


class MambaMixer(nn.Module):
    """Mamba (S6) mixer; ``bimamba=True`` is Vim's bidirectional "v2" mixer.

    The v2 mixer shares ``in_proj``/``out_proj`` and has a second set of ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
    ``A_b_log``, ``D_b`` that scans the sequence from the last token to the first; the two outputs are summed (and
    divided by 2 when ``divide_out``, Vim's ``if_devide_out``).

    Args:
        d_model: channels of the residual stream.
        d_state: SSM state size N.
        d_conv: causal depthwise convolution width.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the delta projection; ``"auto"`` is ``ceil(d_model / 16)``.
        bimamba: add the backward-scan parameters (Vim v2).
        divide_out: divide the sum of both directions by 2.
        bias: bias on ``in_proj``/``out_proj``.
        conv_bias: bias on the convolutions.

    Example:
        >>> import torch
        >>> from vmq_fx.models.mamba import MambaMixer
        >>> MambaMixer(d_model=16, bimamba=True)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bimamba: bool = False,
        divide_out: bool = True,
        bias: bool = False,
        conv_bias: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba = bimamba
        self.divide_out = divide_out
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for suffix in ("", "_b") if bimamba else ("",):
            conv = nn.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
            )
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            std = self.dt_rank**-0.5 * dt_scale
            nn.init.uniform_(dt_proj.weight, -std, std)
            init_dt_bias(dt_proj, dt_min, dt_max, dt_init_floor)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            setattr(self, "A_log" if not suffix else "A_b_log", init_a_log(self.d_inner, d_state))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))

    def _scan(self, x: Tensor, z: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
              a_log: Tensor, d: Tensor, reverse: bool) -> Tensor:
        """One direction. x, z: [batch, L, d_inner]; returns [batch, d_inner, L].

        ``reverse`` is the backward direction: the convolution and the scan run from the last token to the first on
        the tensors as they are, which equals Vim's flip -> forward branch -> flip without copying anything.
        """
        x = causal_conv1d_fn(x, conv.weight[:, 0], conv.bias, silu=True, reverse=reverse)  # [batch, L, d_inner]
        x_dbl = x_proj(x)  # [batch, L, dt_rank + 2N]
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight)  # bias goes into the scan as delta_bias
        return selective_scan_fn(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            -torch.exp(a_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            d.float(),
            z=z.transpose(1, 2),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            reverse=reverse,
        )

    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        """hidden_states: [batch, L, d_model] -> [batch, L, d_model].

        ``inference_params`` exists for call compatibility with mamba-ssm's ``Mamba``; step-by-step decoding with a
        cache is not supported (vision models process whole sequences).
        """
        if inference_params is not None:
            raise ValueError("MambaMixer: incremental decoding (inference_params) is not supported")
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        y = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, reverse=False)
        if self.bimamba:
            y_b = self._scan(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, reverse=True)
            y = y + y_b
            if self.divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))
