"""Helpers shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def round_half_even(v):
    """``torch.round`` (ties to even) of a float32 block."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


def gemm_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M (batch 1 x few tokens) is weight-bandwidth bound, so narrow M tiles;
    large M: square tiles."""
    return (16, 64, 64) if m <= 64 else (64, 64, 64)
