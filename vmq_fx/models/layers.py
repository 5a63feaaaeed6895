"""Small layers shared by the model definitions."""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DropPath", "check_image_shape"]


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def check_image_shape(x: Tensor, channels: int, img_size: int, model: str) -> None:
    """Raise a clear error when an image batch does not have the shape a model's static token count needs."""
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != img_size or x.shape[3] != img_size:
        raise ValueError(
            f"{model} expects images of shape [batch, {channels}, {img_size}, {img_size}] (its token count and "
            f"position embedding are fixed at build time), got {tuple(x.shape)}"
        )
