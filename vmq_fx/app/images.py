"""Images from folders: labelled folders (one subfolder per class, the ImageNet-val layout) and flat folders of
unlabelled images, prepared with a model's :class:`~vmq_fx.models.Preprocess` and streamed through a ``DataLoader``.

When the class folders are ImageNet WordNet ids (``n01440764`` ...) and the model has 1000 classes, each folder maps
to its index in the standard 1000-class order (the list timm ships, ``timm/data/_info/imagenet_synsets.txt``; read as a
file, timm is not imported), so a subset of the ImageNet classes is scored correctly. Other folder names map to
0..C-1 in sorted order.

Everything that can be checked without decoding every image is checked when a folder is opened: the folder exists,
holds images, has no more classes than the model; every image's header is read (naming the first unreadable file).
Grayscale, RGBA, CMYK and palette images are converted by the preprocessing, not refused.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vmq_fx.models.preprocess import Preprocess

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "ImageFiles", "ImageReadError", "batches", "calibration_batch",
           "imagenet_class_names", "imagenet_synsets"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_WNID = re.compile(r"n\d{8}")


class ImageReadError(ValueError):
    """An image file could not be read or decoded (the message names it)."""


def _open(path: Path, verify: bool = False):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        if verify:
            image.verify()  # the whole file, without decoding pixels
            image = Image.open(path)
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: {str(e).splitlines()[0][:200]}") from e


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _images_below(folder: Path) -> list[Path]:
    """Every image in ``folder`` and its subfolders (symbolic links followed, each real folder once), sorted."""
    seen, found = set(), []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link back up the tree
            dirs.clear()
            continue
        seen.add(real)
        found += [Path(parent) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    return folder


def _timm_list(name: str) -> Path:
    """A file of the class lists timm ships (read as a file: timm is not imported)."""
    spec = importlib.util.find_spec("timm")
    path = None if spec is None or not spec.submodule_search_locations else (
        Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / name)
    if path is None or not path.is_file():
        raise ImportError(f"the ImageNet class list {name} ships with timm (pip install --no-deps timm); without it, "
                          "name class folders 0..C-1 in class order")
    return path


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (timm's list, read from its installed files)."""
    path = _timm_list("imagenet_synsets.txt")
    synsets = path.read_text().split()
    if len(synsets) != 1000:
        raise ValueError(f"{path}: expected 1000 WordNet ids, found {len(synsets)}")
    return synsets


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order: the first lemma of each synset (timm's lists)."""
    lemmas = dict(line.split("\t", 1) for line in _timm_list("imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in line)
    return [lemmas.get(s, s).split(",")[0].strip() for s in imagenet_synsets()]


class _Images(Dataset):
    def __init__(self, files: list[Path], labels: list[int] | None, preprocess: Preprocess):
        self.files, self.labels, self.preprocess = files, labels, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            x = self.preprocess(_open(self.files[i]))
        except ImageReadError:
            raise
        except Exception as e:  # truncated data found while decoding pixels
            raise ImageReadError(f"cannot decode image {self.files[i]}: {str(e).splitlines()[0][:200]}") from e
        return x if self.labels is None else (x, self.labels[i])


@dataclass
class ImageFolder:
    """A labelled folder: ``root/<class>/<image>``.

    Args:
        root: the folder.
        num_classes: the model's classes (more class folders than that are refused).
        preprocess: the model's preprocessing.

    Attributes:
        classes: the class folder names, sorted; ``class_index[name]`` is the model's output index of each.
    """

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    class_index: dict[str, int]
    preprocess: Preprocess

    @classmethod
    def open(cls, root: str | os.PathLike, num_classes: int, preprocess: Preprocess) -> "ImageFolder":
        root = _check_folder(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            loose = _images_in(root)
            raise ValueError(f"{root} has no class subfolders" + (
                f" (it holds {len(loose)} images directly: a folder of unlabelled images is for calibration, "
                "--calib-dir)" if loose else ""))
        if all(_WNID.fullmatch(c) for c in classes) and num_classes == 1000:
            synsets = {s: i for i, s in enumerate(imagenet_synsets())}
            unknown = [c for c in classes if c not in synsets]
            if unknown:
                raise ValueError(f"{root}: class folders {unknown[:5]} are not ImageNet-1k WordNet ids")
            index = {c: synsets[c] for c in classes}
        else:
            if len(classes) > num_classes:
                raise ValueError(f"{root} has {len(classes)} class folders but the model has {num_classes} classes")
            index = {c: i for i, c in enumerate(classes)}
        files, labels = [], []
        for c in classes:
            for f in _images_in(root / c):
                files.append(f)
                labels.append(index[c])
        if not files:
            raise ValueError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:  # headers only: cheap, and a broken file is named now rather than mid-evaluation
            _open(f)
        return cls(root, files, labels, classes, index, preprocess)

    def dataset(self) -> Dataset:
        return _Images(self.files, self.labels, self.preprocess)


@dataclass
class ImageFiles:
    """Unlabelled images (calibration): a folder and its subfolders, so a flat folder and an ImageNet-style training
    folder (one subfolder per class) both serve; class folders are not labels here."""

    root: Path
    files: list[Path]
    preprocess: Preprocess

    @classmethod
    def open(cls, root: str | os.PathLike, preprocess: Preprocess) -> "ImageFiles":
        root = _check_folder(root)
        files = _images_below(root)
        if not files:
            raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}), nor do its subfolders")
        return cls(root, files, preprocess)

    def sample(self, n: int, seed: int = 0) -> "ImageFiles":
        """``n`` files drawn without replacement with ``seed`` (all of them when there are fewer)."""
        if n < 1:
            raise ValueError(f"the number of calibration images must be positive, got {n}")
        order = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed)).tolist()
        return ImageFiles(self.root, [self.files[i] for i in sorted(order[:n])], self.preprocess)

    def split(self, n: int) -> tuple["ImageFiles", "ImageFiles"]:
        """The first ``n`` files and the rest."""
        return (ImageFiles(self.root, self.files[:n], self.preprocess),
                ImageFiles(self.root, self.files[n:], self.preprocess))

    def dataset(self) -> Dataset:
        for f in self.files:
            _open(f, verify=True)
        return _Images(self.files, None, self.preprocess)


def batches(images: ImageFolder | ImageFiles, batch_size: int = 64, workers: int | None = None):
    """Batches in file order (``x`` or ``(x, labels)``), decoded in ``workers`` processes (default: up to 4, fewer on
    small machines), so that a large folder is streamed and never held in memory whole. An image that fails to
    decode in a worker is reported by name (:class:`ImageReadError`), not by the worker's traceback."""
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    data = DataLoader(images.dataset(), batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        yield from data
    except ImageReadError as e:  # re-raised by the DataLoader with the worker's traceback in the message
        last = str(e).strip().splitlines()[-1]
        raise ImageReadError(last.split("ImageReadError: ", 1)[-1]) from None


def calibration_batch(images: ImageFiles, progress: bool = False) -> Tensor:
    """All the (sampled) calibration images as one tensor ``[N, C, S, S]`` (256 images at 224x224: 154 MB)."""
    from tqdm.auto import tqdm

    parts = list(tqdm(batches(images, batch_size=32), desc="read calibration images", disable=not progress,
                      leave=False))
    return torch.cat(parts)
