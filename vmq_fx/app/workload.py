"""Where a quantization run's images come from and how its models are scored.

* :class:`FashionMNISTWorkload`: the shipped reference models; calibration from the training split, top-1 on the
  test split.
* :class:`FolderWorkload`: a user's model and images; calibration from a folder of images (a seeded sample), top-1 on
  a labelled folder when there is one, else agreement with the floating-point model (top-1 agreement and logit SQNR)
  on held-out images of the calibration folder, which the report says.

Both score torch models and onnxruntime files the same way, so that a report's columns compare like with like.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FashionMNISTWorkload", "FolderWorkload", "Score", "fashion_mnist_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    value: float  # the number that is plotted: top-1 % or top-1 agreement %
    text: str  # what the report's table shows

    def __str__(self) -> str:
        return self.text


def _ort_logits(path, images: Tensor, threads: int | None, batch_size: int = 64) -> Tensor:
    from vmq_fx.export import ort_session

    sess = ort_session(path, threads=threads or None)
    feed = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {feed: c.numpy()})[0]) for c in images.split(batch_size)])


def _top1_text(correct: int, total: int) -> Score:
    return Score(100.0 * correct / total, f"{100.0 * correct / total:.2f}")


class FashionMNISTWorkload:
    """Fashion-MNIST (the Debian package ``dataset-fashion-mnist``), for 28x28 single-channel models."""

    metric = "top-1 %"

    def __init__(self, calib: int, limit: int | None = None, data_dir=None, seed: int = 0):
        from vmq_fx.app.data import calibration_images, fashion_mnist, normalize

        images, labels = fashion_mnist("test", data_dir)
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels = normalize(images), labels
        self.calibration = calibration_images(calib, seed=seed, data_dir=data_dir)
        self.description = (f"Top-1 on {len(labels)} Fashion-MNIST test images; {calib} calibration images from the "
                            f"training split (seed {seed}).")

    def set_reference(self, model) -> None:
        pass

    @torch.no_grad()
    def score(self, model, progress: bool = False) -> Score:
        from vmq_fx.app.evaluate import predict

        logits = predict(model, self.images, progress=progress)
        return _top1_text(int((logits.argmax(-1) == self.labels).sum()), len(self.labels))

    def score_onnx(self, path, threads: int | None = None) -> Score:
        logits = _ort_logits(path, self.images, threads, batch_size=500)
        return _top1_text(int((logits.argmax(-1) == self.labels).sum()), len(self.labels))


class FolderWorkload:
    """A user's images: ``calib_dir`` (searched with its subfolders; labels unused) and optionally ``eval_dir`` (one
    subfolder per class).

    Args:
        preprocess: the model's preprocessing (``model.config.preprocess``).
        num_classes: the model's classes.
        calib_dir: folder of calibration images; ``calib`` of them are drawn with ``seed``.
        eval_dir: labelled folder for top-1, or ``None``: agreement with the FP model on up to ``holdout`` images of
            ``calib_dir`` that were not drawn for calibration.
        limit: score on the first ``limit`` images of ``eval_dir`` only.

    Attributes:
        calibration: the drawn calibration images as a map-style dataset, decoded where they are used: under
            ``torchrun`` each process decodes and holds only its share.
    """

    def __init__(self, preprocess, num_classes: int, calib_dir, calib: int, seed: int = 0, eval_dir=None,
                 limit: int | None = None, holdout: int = 64, workers: int | None = None, progress: bool = True):
        from vmq_fx.app.images import ImageFiles, ImageFolder, calibration_batch

        files = ImageFiles.open(calib_dir, preprocess)
        self.folder = ImageFolder.open(eval_dir, num_classes, preprocess) if eval_dir else None
        if self.folder is not None and limit:
            self.folder.files, self.folder.labels = self.folder.files[:limit], self.folder.labels[:limit]
        _check_image_sizes(files.files[:8], preprocess)
        chosen = files.sample(calib, seed)
        if len(chosen.files) < calib:
            log.warning("%s holds %d images, fewer than the %d calibration images asked for: using all of them",
                        files.root, len(files.files), calib)
        self.workers = workers
        self.calibration = chosen.dataset()
        if self.folder is not None:
            self.metric = "top-1 %"
            self.description = (f"Top-1 on {len(self.folder.files)} images of {self.folder.root} "
                                f"({len(self.folder.classes)} classes); {len(chosen.files)} calibration images drawn "
                                f"from {files.root} (seed {seed}).")
            self.holdout = None
        else:
            used = set(chosen.files)
            rest = [f for f in files.files if f not in used][:holdout]
            if not rest:
                raise ValueError(f"{files.root}: no images left besides the {len(chosen.files)} calibration images to "
                                 "measure agreement on; give a labelled --eval-dir or fewer --calib images")
            self.holdout = calibration_batch(ImageFiles(files.root, rest, preprocess), progress=progress)
            self.metric = "top-1 agreement with FP % (logit SQNR dB)"
            self.description = (f"No labelled folder: agreement with the FP32 model (same top-1 class, and the SQNR of "
                                f"the logits) on {len(rest)} held-out images of {files.root}, not accuracy; "
                                f"{len(chosen.files)} calibration images drawn from the same folder (seed {seed}).")
        self._reference: Tensor | None = None

    def set_reference(self, model) -> None:
        """The FP model whose logits the agreement is measured against (no-op with a labelled folder)."""
        if self.holdout is not None:
            with torch.no_grad():
                self._reference = torch.cat([model(x) for x in self.holdout.split(64)])

    def _agreement(self, logits: Tensor) -> Score:
        ref = self._reference
        if ref is None:
            raise RuntimeError("FolderWorkload: set_reference(fp_model) before scoring without a labelled folder")
        same = 100.0 * float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        noise = float((logits.double() - ref.double()).pow(2).sum())
        sqnr = math.inf if noise == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / noise)
        return Score(same, f"{same:.2f} ({sqnr:.1f} dB)")

    def score(self, model, progress: bool = False) -> Score:
        if self.folder is None:
            with torch.no_grad():
                return self._agreement(torch.cat([model(x) for x in self.holdout.split(64)]))
        from vmq_fx.app.evaluate import evaluate_folder

        res = evaluate_folder(model, self.folder, workers=self.workers, progress=progress)
        return _top1_text(res.correct, res.total)

    def score_onnx(self, path, threads: int | None = None) -> Score:
        if self.folder is None:
            return self._agreement(_ort_logits(path, self.holdout, threads))
        from vmq_fx.export import ort_session
        from vmq_fx.app.images import batches

        sess = ort_session(path, threads=threads or None)
        feed = sess.get_inputs()[0].name
        correct = total = 0
        for x, y in batches(self.folder, 64, self.workers):
            correct += int((torch.from_numpy(sess.run(None, {feed: x.numpy()})[0]).argmax(-1) == y).sum())
            total += len(y)
        return _top1_text(correct, total)


def _check_image_sizes(files, preprocess) -> None:
    """Refuse a folder whose images are far smaller than the model's input: upscaling 32x32 images to 224x224 is
    almost surely a folder meant for another model."""
    from vmq_fx.app.images import _open

    for f in files:
        w, h = _open(f).size
        if min(w, h) * 2 < preprocess.input_size:
            raise ValueError(f"{f} is {w}x{h}, far smaller than the {preprocess.input_size}x{preprocess.input_size} "
                             "input of the model: is this folder meant for another model?")


def fashion_mnist_model(model) -> bool:
    """Whether ``model`` takes Fashion-MNIST's 28x28 single-channel images."""
    cfg = getattr(model, "config", None)
    return cfg is not None and cfg.img_size == 28 and cfg.in_chans == 1
