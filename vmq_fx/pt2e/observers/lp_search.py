"""Lp-error range searches used to initialize PTQ4VM's step sizes (p = 2.4, 100 candidates), and the per-row
histograms that let the activation search run on all calibration values at a fixed cost."""
from __future__ import annotations

import torch
from torch import Tensor

from vmq_fx.ops.calibration import best_ranges, count_rows, grow_histograms, lp_error

__all__ = ["RowHistograms", "round_ste", "search_asymmetric_ranges", "search_symmetric_clips"]


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


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
        err = lp_error(w - q, p, dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale


@torch.no_grad()
def search_asymmetric_ranges(x: Tensor, lo: Tensor, hi: Tensor, levels: int, p: float = 2.4,
                             num_candidates: int = 100, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` [rows, samples]: shrink [lo, hi] toward its midpoint over ``num_candidates`` steps and keep the
    range whose asymmetric quantization to [0, levels - 1] has the least Lp error on the row's samples.

    The chosen range is widened to contain 0 (so that 0 is exactly representable), as PTQ4VM does.

    Args:
        weights: how many values each sample stands for (a histogram: ``x`` the bin centers, ``weights`` the
            counts); ``None``: one each.

    Returns ``(scale [rows], zero_point [rows] as integers in float)``.
    """
    best_lo, best_hi = best_ranges(x.float(), lo, hi, levels, p, num_candidates, weights)
    return _widened_to_zero(best_lo, best_hi, levels)


def _widened_to_zero(best_lo: Tensor, best_hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    best_lo, best_hi = best_lo.clamp(max=0.0), best_hi.clamp(min=0.0)
    scale = ((best_hi - best_lo) / (levels - 1)).clamp(min=1e-8)
    zero_point = (-best_lo / scale).round().clamp(0, levels - 1)
    return scale, zero_point


class RowHistograms:
    """One histogram per row (per token position) of values streamed in batches, over a range that grows.

    Each row starts with ``bins`` bins spanning its first batch; when later values fall outside, the bin width of that
    row doubles (pairs of bins merge, the old range becomes one half of the new one) until they fit, so the counts
    stay exact while the resolution adapts. Memory is ``rows x bins`` floats, whatever the number of values.

    Example:
        >>> h = RowHistograms(bins=8)
        >>> h.add(torch.tensor([[0.0, 1.0, 2.0]])); h.add(torch.tensor([[5.0]]))
        >>> h.counts.sum().item(), h.centers().shape
        (4.0, torch.Size([1, 8]))
    """

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins % 2:  # halving merges pairs of bins
            raise ValueError(f"RowHistograms: bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.counts: Tensor | None = None  # [rows, bins]
        self.start: Tensor | None = None  # [rows] left edge
        self.width: Tensor | None = None  # [rows] bin width

    def _grow(self, lo: Tensor, hi: Tensor) -> None:
        """Double the width of the rows whose range does not hold [lo, hi], until every row does."""
        self.counts, self.start, self.width = grow_histograms(self.counts, self.start, self.width, lo, hi)

    def _open(self, rows: int, lo: Tensor, hi: Tensor) -> None:
        if self.counts is None:
            self.counts = lo.new_zeros(rows, self.bins, dtype=torch.float32)
            self.start = lo.float().clone()  # the C++ kernel grows it in place: never the caller's tensor
            # a little headroom so that the first batch's maximum falls inside the last bin
            self.width = ((hi.float() - lo.float()) * (1 + 1e-6) / self.bins).clamp(
                min=torch.finfo(torch.float32).tiny * 1e6)

    def _start(self, rows: int, lo: Tensor, hi: Tensor) -> None:
        self._open(rows, lo, hi)
        self._grow(lo, hi)

    @torch.no_grad()
    def add(self, rows: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> None:
        """Count the values of ``rows`` [R, n] (``lo`` / ``hi``: their per-row min and max, when known)."""
        rows = rows.float()
        lo = rows.amin(1) if lo is None else lo
        hi = rows.amax(1) if hi is None else hi
        self._start(rows.shape[0], lo, hi)
        self.counts = count_rows(self.counts, self.start, self.width, rows)

    @torch.no_grad()
    def add_tokens(self, x: Tensor, lo: Tensor, hi: Tensor) -> None:
        """Count an activation [batch, L, C] into the L token histograms, pooled over images and channels
        (``lo`` / ``hi``: its per-token min and max): ``vmq::histogram_add``, growth and counting in one op."""
        self._open(x.shape[1], lo, hi)
        self.counts, self.start, self.width = (t.contiguous() for t in (self.counts, self.start, self.width))
        torch.ops.vmq.histogram_add(x, self.counts, self.start, self.width, lo, hi)

    def state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(counts, start, width)``, or ``None`` before any value."""
        return None if self.counts is None else (self.counts, self.start, self.width)

    @classmethod
    def merged(cls, bins: int, states: list[tuple[Tensor, Tensor, Tensor]]) -> "RowHistograms":
        """One histogram per row holding the counts of several (the :meth:`state` of each, e.g. one per process).

        Per row, the grid is the coarsest of theirs, grown by doubling until it holds every other's bins; each bin of
        each histogram is then counted at its center, as the range search reads it (exact for the coarsest one, whose
        bins nest in the grown grid; within one of its own bins for the others).
        """
        out = cls(bins)
        counts, starts, widths = (torch.stack(t) for t in zip(*states))  # [P, rows, bins], [P, rows], [P, rows]
        coarsest = widths.argmax(0, keepdim=True)  # [1, rows]
        start, width = starts.gather(0, coarsest)[0], widths.gather(0, coarsest)[0]
        steps = torch.arange(bins, dtype=torch.float32, device=counts.device) + 0.5
        centers = starts[..., None] + widths[..., None] * steps  # [P, rows, bins]
        _, start, width = grow_histograms(torch.zeros_like(counts[0]), start.clone(), width.clone(),
                                          centers[..., 0].amin(0), centers[..., -1].amax(0))
        idx = ((centers - start[:, None]) / width[:, None]).floor().long().clamp_(0, bins - 1)
        total = torch.zeros_like(counts[0])
        for part_idx, part_counts in zip(idx, counts):
            total.scatter_add_(1, part_idx, part_counts)
        out.counts, out.start, out.width = total, start, width
        return out

    def search(self, lo: Tensor, hi: Tensor, levels: int, p: float = 2.4,
               num_candidates: int = 100) -> tuple[Tensor, Tensor]:
        """:func:`search_asymmetric_ranges` on the histograms (bin centers weighted by their counts):
        ``vmq::histogram_search``, then widened to hold 0; ``(scale, zero_point)`` per row."""
        best_lo, best_hi = torch.ops.vmq.histogram_search(self.counts, self.start, self.width, lo, hi, levels, p,
                                                          num_candidates)
        return _widened_to_zero(best_lo, best_hi, levels)

    def centers(self) -> Tensor:
        """Bin centers [rows, bins]."""
        steps = torch.arange(self.bins, device=self.counts.device, dtype=torch.float32) + 0.5
        return self.start[:, None] + self.width[:, None] * steps
