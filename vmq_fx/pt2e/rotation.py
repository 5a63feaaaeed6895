"""Orthogonal rotations of a linear's input (QuaRot / MambaQuant-style), so that outlier channels are spread over
all channels before the activations are quantized.

A rotation ``R`` (orthogonal, ``R @ R.T == I``) changes nothing in floating point: ``x @ W.T == (x @ R) @ (W @ R).T``.
Quantized, ``q(x @ R) @ q(W @ R).T`` sees activations whose channels share their outliers: a channel 10x larger
than the median (the ``out_proj`` inputs of Vim, see ``bench/results/activation_ranges.md``) becomes a few percent
of every channel instead of the whole range of a per-token step.

Two kinds, named by :attr:`vmq_fx.pt2e.recipes.PTQ4VMRecipe.rotation`:

* ``"hadamard"``: a normalized Walsh-Hadamard matrix. Its size must be a power of two; for ``d = 2^k * m`` with
  ``m`` odd (Vim-T: 192 = 64 * 3) the matrix is ``kron(Q_m, H_{2^k})`` with ``Q_m`` a fixed random orthogonal
  ``m x m`` matrix, so that every output channel still mixes all ``d`` inputs. Needs no calibration data. The
  activation side is applied in its factored form by ``vmq::hadamard_transform`` (:mod:`vmq_fx.ops.hadamard`: the fast
  Walsh-Hadamard transform, then ``Q_m``): ``d (k + m)`` operations per token instead of ``d^2``, and only ``Q_m`` is
  stored (one per odd size for the whole model).
* ``"klt"``: MambaQuant's KLT-enhanced rotation ``K @ H``, ``K`` the eigenvectors of the calibration inputs'
  second-moment matrix (the Karhunen-Loeve transform): in that basis the channels are uncorrelated, and the
  Hadamard matrix then spreads their unequal variances evenly.

Example:
    >>> import torch
    >>> from vmq_fx.pt2e.rotation import hadamard
    >>> r = hadamard(12)
    >>> bool(torch.allclose(r @ r.T, torch.eye(12, dtype=torch.float64), atol=1e-12))
    True
"""
from __future__ import annotations

import torch
from torch import Tensor

from vmq_fx.ops.hadamard import walsh_hadamard

__all__ = ["ROTATIONS", "hadamard", "hadamard_factors", "klt"]

ROTATIONS = ("none", "hadamard", "klt")
_SEED = 0x5EED  # the odd factor's orthogonal matrix: fixed, so that a recipe always means the same rotation


def _random_orthogonal(m: int) -> Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(_SEED + m)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()  # the Haar-distributed factor, not LAPACK's sign convention


def hadamard_factors(d: int) -> tuple[Tensor, Tensor]:
    """``(Q_m, H_{2^k})`` (float64) for ``d = 2^k * m``, m odd: the factors of :func:`hadamard`.

    Raises:
        ValueError: ``d < 1``.
    """
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"hadamard: the size must be a positive integer, got {d!r}")
    power = d & -d  # the largest power of two dividing d
    return _random_orthogonal(d // power), walsh_hadamard(power)


def hadamard(d: int) -> Tensor:
    """The ``d x d`` rotation of kind ``"hadamard"`` (float64): ``kron(Q_m, H_{2^k})`` for ``d = 2^k * m``, m odd.

    Raises:
        ValueError: ``d < 1``.
    """
    return torch.kron(*hadamard_factors(d))


def klt(second_moment: Tensor) -> Tensor:
    """MambaQuant's KLT-enhanced rotation ``K @ H`` (float64) from the inputs' second-moment matrix ``E[x^T x]``.

    Args:
        second_moment: ``[d, d]``, symmetric positive semi-definite.

    Raises:
        ValueError: not a square matrix, or not finite.
    """
    if second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"klt: expected a square second-moment matrix, got shape {tuple(second_moment.shape)}")
    c = second_moment.double()
    if not torch.isfinite(c).all():
        raise ValueError("klt: the second-moment matrix is not finite (inf or nan in the calibration inputs?)")
    _, vectors = torch.linalg.eigh((c + c.T) / 2)
    return vectors @ hadamard(c.shape[0])
