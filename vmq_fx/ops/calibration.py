"""The ops calibration runs on every activation it observes (``csrc/calibration.cpp`` holds their C++ kernels):

* ``vmq::token_stats(x)``: per-token min and max and per-channel max ``|x|`` of a ``[batch, L, channels]``
  activation (one pass in C++, three and a transposing copy in torch);
* ``vmq::histogram_add(x, counts, start, width, lo, hi)``: grow each token's histogram range to hold ``[lo, hi]``
  (pairs of bins merge, the width doubles) and count the activation's values into it, pooled over images and
  channels; ``counts``, ``start`` and ``width`` are updated in place;
* ``vmq::histogram_search(counts, start, width, lo, hi, levels, p, num_candidates)``: PTQ4VM's Lp range search over
  the histograms, each bin standing for its values at its center: the range ``[best_lo, best_hi]`` per row.

The pure-torch implementations here are the reference and the fallback; the dispatcher picks the C++ kernels on CPU
where they are built, like the other vmq ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vmq_fx.ops import native

__all__ = ["best_ranges", "count_rows", "grow_histograms", "histogram_add", "histogram_search", "lp_error",
           "token_stats"]


def lp_error(err: Tensor, p: float, dim: int, weights: Tensor | None = None) -> Tensor:
    """``sum |err|^p`` along ``dim`` (each element counted ``weights`` times)."""
    e = err.abs().pow(p)
    return (e if weights is None else e * weights).sum(dim)


def best_ranges(x: Tensor, lo: Tensor, hi: Tensor, levels: int, p: float, num_candidates: int,
                weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` [rows, samples]: shrink [lo, hi] toward its midpoint over ``num_candidates`` steps and keep the
    range whose asymmetric quantization to [0, levels - 1] has the least Lp error (before any widening to 0)."""
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
        err = lp_error(x - (q - zp) * scale, p, dim=1, weights=weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def grow_histograms(counts: Tensor, start: Tensor, width: Tensor, lo: Tensor, hi: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Double the bin width of the rows whose range does not hold [lo, hi], until every row does; returns the new
    ``(counts, start, width)``."""
    half = counts.shape[1] // 2
    while True:
        end = start + width * counts.shape[1]
        left, right = lo < start, hi >= end
        grow = left | right
        if not bool(grow.any()):
            return counts, start, width
        merged = counts.reshape(-1, half, 2).sum(-1)
        zeros = torch.zeros_like(merged)
        # growing to the left puts the old range in the upper half of the new one
        grown = torch.where(left[:, None], torch.cat([zeros, merged], 1), torch.cat([merged, zeros], 1))
        counts = torch.where(grow[:, None], grown, counts)
        start = torch.where(left, start - width * counts.shape[1], start)
        width = torch.where(grow, width * 2, width)


def count_rows(counts: Tensor, start: Tensor, width: Tensor, rows: Tensor) -> Tensor:
    """``counts`` plus the values of ``rows`` [R, n], each in its row's bin (out-of-range values in the end bins)."""
    bins = counts.shape[1]
    idx = ((rows.float() - start[:, None]) / width[:, None]).floor().long().clamp_(0, bins - 1)
    flat = idx + torch.arange(rows.shape[0], device=rows.device)[:, None] * bins
    counts = counts.contiguous().clone()
    counts.view(-1).scatter_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=counts.dtype,
                                                                 device=counts.device))
    return counts


def _check_activation(op: str, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"vmq.{op}: x must be [batch, L, channels], got {list(x.shape)}")


@torch.library.custom_op("vmq::token_stats", mutates_args=())
@native.builds_on_first_call("token_stats")
def token_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(min per token [L], max per token [L], max |x| per channel [channels])`` of ``x`` [batch, L, channels]."""
    _check_activation("token_stats", x)
    x = x.float()
    return x.amin(dim=(0, 2)), x.amax(dim=(0, 2)), x.abs().amax(dim=(0, 1))


@token_stats.register_fake
def _(x):
    _check_activation("token_stats", x)
    return x.new_empty(x.shape[1]), x.new_empty(x.shape[1]), x.new_empty(x.shape[2])


@torch.library.custom_op("vmq::histogram_add", mutates_args=("counts", "start", "width"))
@native.builds_on_first_call("histogram_add")
def histogram_add(x: Tensor, counts: Tensor, start: Tensor, width: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Grow the L token histograms (``counts`` [L, bins], ``start`` / ``width`` [L]) to hold [lo, hi] and count
    ``x`` [batch, L, channels] into them, pooled over images and channels (in place)."""
    _check_activation("histogram_add", x)
    if counts.dim() != 2 or counts.shape[0] != x.shape[1] or counts.shape[1] % 2 or start.shape != (x.shape[1],) \
            or width.shape != (x.shape[1],):
        raise ValueError(f"vmq.histogram_add: counts must be [L={x.shape[1]}, bins] (bins even), start and width "
                         f"[L], got {list(counts.shape)}, {list(start.shape)}, {list(width.shape)}")
    c, s, w = grow_histograms(counts, start, width, lo.float(), hi.float())
    c = count_rows(c, s, w, x.transpose(0, 1).reshape(x.shape[1], -1))
    counts.copy_(c)
    start.copy_(s)
    width.copy_(w)


@histogram_add.register_fake
def _(x, counts, start, width, lo, hi):
    return None


@torch.library.custom_op("vmq::histogram_search", mutates_args=())
@native.builds_on_first_call("histogram_search")
def histogram_search(counts: Tensor, start: Tensor, width: Tensor, lo: Tensor, hi: Tensor, levels: int, p: float,
                     num_candidates: int) -> tuple[Tensor, Tensor]:
    """:func:`best_ranges` on the histograms, each bin at its center weighted by its count: ``(best_lo, best_hi)``."""
    steps = torch.arange(counts.shape[1], device=counts.device, dtype=torch.float32) + 0.5
    centers = start.float()[:, None] + width.float()[:, None] * steps
    return best_ranges(centers, lo.float(), hi.float(), levels, p, num_candidates, weights=counts.float())


@histogram_search.register_fake
def _(counts, start, width, lo, hi, levels, p, num_candidates):
    return lo.new_empty(lo.shape), hi.new_empty(hi.shape)
