"""Lp-error range searches used to initialize PTQ4VM's step sizes (p = 2.4, 100 candidates)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "search_asymmetric_ranges", "search_symmetric_clips"]


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def _lp(err: Tensor, p: float, dim: int) -> Tensor:
    return err.abs().pow(p).sum(dim)


@torch.no_grad()
def search_symmetric_clips(w: Tensor, qmax: int, p: float = 2.4, num_candidates: int = 100) -> Tensor:
    """Per row of ``w`` [rows, cols]: the clip ``max|w_row| * i / num_candidates`` (i = 1..num_candidates) whose
    symmetric quantization to [-qmax, qmax] has the least Lp error. Returns scales [rows] (clip / qmax)."""
    w = w.float()
    absmax = w.abs().amax(dim=1).clamp(min=1e-8)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax / qmax
    for i in range(1, num_candidates + 1):
        scale = (absmax * (i / num_candidates) / qmax)[:, None]
        q = (w / scale).round().clamp(-qmax, qmax) * scale
        err = _lp(w - q, p, dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale


@torch.no_grad()
def search_asymmetric_ranges(x: Tensor, lo: Tensor, hi: Tensor, levels: int, p: float = 2.4,
                             num_candidates: int = 100) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` [rows, samples]: shrink [lo, hi] toward its midpoint over ``num_candidates`` steps and keep the
    range whose asymmetric quantization to [0, levels - 1] has the least Lp error on the row's samples.

    The chosen range is widened to contain 0 (so that 0 is exactly representable), as PTQ4VM does.

    Returns ``(scale [rows], zero_point [rows] as integers in float)``.
    """
    x = x.float()
    mid = (lo + hi) / 2
    half = (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(num_candidates):
        shrink = 1.0 - i / num_candidates
        c_lo, c_hi = mid - half * shrink, mid + half * shrink
        scale = ((c_hi - c_lo) / (levels - 1)).clamp(min=1e-8)[:, None]
        zp = (-c_lo[:, None] / scale).round()
        q = ((x / scale).round() + zp).clamp(0, levels - 1)
        err = _lp(x - (q - zp) * scale, p, dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    best_lo, best_hi = best_lo.clamp(max=0.0), best_hi.clamp(min=0.0)
    scale = ((best_hi - best_lo) / (levels - 1)).clamp(min=1e-8)
    zero_point = (-best_lo / scale).round().clamp(0, levels - 1)
    return scale, zero_point
