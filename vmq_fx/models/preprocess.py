"""How images are prepared for a model: part of its configuration, as timm's ``pretrained_cfg`` is.

The evaluation transform of the Vim / VMamba / timm code: resize the shorter side to ``floor(input_size /
crop_pct)`` (bicubic), center-crop ``input_size``, scale to [0, 1], normalize with the mean and standard deviation.
Written with Pillow and torch alone (torchvision is not needed); the arithmetic follows torchvision's ``Resize`` (the
longer side is ``int(size * long / short)``), ``CenterCrop`` (offsets rounded half to even) and ``ToTensor``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["FASHION_MNIST", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "default_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Evaluation-time preprocessing of a model's input images.

    Args:
        input_size: side of the square input.
        in_chans: 3 (images are converted to RGB) or 1 (to grayscale).
        mean, std: per-channel normalization, on the [0, 1] scale.
        crop_pct: the center crop's share of the resized shorter side (1.0: resize straight to ``input_size``).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.

    Example:
        >>> from PIL import Image
        >>> Preprocess()(Image.new("RGB", (640, 480))).shape
        torch.Size([3, 224, 224])
    """

    input_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.input_size < 1 or self.in_chans not in (1, 3):
            raise ValueError(f"Preprocess: input_size must be positive and in_chans 1 or 3, got {self}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or min(self.std) <= 0:
            raise ValueError(f"Preprocess: mean and std need {self.in_chans} values (std positive), got {self}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"Preprocess: crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"Preprocess: interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def resize_size(self) -> int:
        """The shorter side before the center crop."""
        return math.floor(self.input_size / self.crop_pct)

    def __call__(self, image) -> Tensor:
        """A PIL image (any mode: grayscale, RGBA, CMYK, palette ... are converted) -> float tensor [C, S, S]."""
        from PIL import Image

        image = image.convert("RGB" if self.in_chans == 3 else "L")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        size = self.resize_size
        if short != size:
            new_long = int(size * long / short)
            new = (size, new_long) if w <= h else (new_long, size)
            resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
            image = image.resize(new, resample[self.interpolation])
        w, h = image.size
        s = self.input_size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255.0)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std


# The shipped reference models: 28x28 grayscale, training-set statistics, no resize or crop.
FASHION_MNIST = Preprocess(input_size=28, in_chans=1, mean=(0.2860,), std=(0.3530,), crop_pct=1.0,
                           interpolation="bilinear")


def default_preprocess(given: "Preprocess | dict | None", img_size: int, in_chans: int) -> Preprocess:
    """A model configuration's preprocessing: the given one (a dict from JSON is accepted), else the ImageNet
    evaluation transform (3 channels) or a plain [0, 1] -> [-1, 1] scaling (1 channel) at ``img_size``. Refuses one
    that does not fit the model's input."""
    if isinstance(given, dict):
        given = Preprocess(**given)
    if given is None:
        given = (Preprocess(input_size=img_size) if in_chans == 3 else
                 Preprocess(input_size=img_size, in_chans=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
                            crop_pct=1.0, interpolation="bilinear"))
    if given.input_size != img_size or given.in_chans != in_chans:
        raise ValueError(f"preprocessing for {given.input_size}x{given.input_size} images with {given.in_chans} "
                         f"channel(s) does not fit a model of {img_size}x{img_size} with {in_chans}")
    return given
