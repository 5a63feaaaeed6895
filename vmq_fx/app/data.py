"""Fashion-MNIST from local IDX files (Debian package ``dataset-fashion-mnist``); nothing downloads.

The directory is, in order: the ``data_dir`` argument, the ``VMQ_DATA_DIR`` environment variable, then
``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "calibration_images",
    "data_directory",
    "fashion_mnist",
    "normalize",
]

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "VMQ_DATA_DIR"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# Training-set pixel statistics (0..1 scale); the reference models are trained on inputs normalized with them.
_MEAN, _STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def data_directory(data_dir: str | os.PathLike | None = None) -> Path:
    """Where Fashion-MNIST is read from: ``data_dir``, else ``$VMQ_DATA_DIR``, else the Debian package's directory."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install the data with "
        f"'apt-get install dataset-fashion-mnist' (puts it in {DEFAULT_DATA_DIR}), or point --data-dir / "
        f"${DATA_DIR_ENV} at a directory holding the four IDX files."
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic} (corrupt or wrong file)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes (truncated file?)")
    return body.reshape(dims)


def fashion_mnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load one split as ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Example:
        >>> from vmq_fx.app.data import fashion_mnist
        >>> images, labels = fashion_mnist("test")
        >>> images.shape, labels.shape
        (torch.Size([10000, 28, 28]), torch.Size([10000]))
    """
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    directory = data_directory(data_dir)
    img_stem, lbl_stem, count = _FILES[split]
    images = _read_idx(_find(directory, img_stem), 2051, 3)
    labels = _read_idx(_find(directory, lbl_stem), 2049, 1)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split} in {directory}: expected {count} images of 28x28, "
                         f"found images {images.shape} and labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: Tensor) -> Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalized as the reference models expect."""
    return ((images.float() / 255.0 - _MEAN) / _STD).unsqueeze(1)


def calibration_images(n: int = 256, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Tensor:
    """A fixed, seeded subset of the *training* split (never the test split), normalized: [n, 1, 28, 28].

    Example:
        >>> from vmq_fx.app.data import calibration_images
        >>> calibration_images(256).shape
        torch.Size([256, 1, 28, 28])
    """
    if n < 1:
        raise ValueError(f"calibration size must be positive, got {n}")
    images, _ = fashion_mnist("train", data_dir)
    if n > len(images):
        raise ValueError(f"calibration size {n} exceeds the {len(images)} training images")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return normalize(images[idx])
