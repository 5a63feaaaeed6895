"""Classify images with an ONNX file exported by vmq_fx, using onnxruntime, numpy and Pillow only (no torch).

    python examples/deploy_onnxruntime.py MODEL.onnx IMAGE [IMAGE ...] [--top K] [--batch N] [--threads N]
                                          [--custom-op-library PATH]

Everything else comes from the file: vmq_fx writes the model's preprocessing (input size and channels, resize and
center crop, interpolation, mean / std), its class names where known, and the custom-op library it needs, if any,
into the ONNX metadata (``vmq_fx.pretrained_cfg``, ``vmq_fx.custom_ops``). Files exported with the portable
standard operators (the default) need nothing more; a file exported with ``--onnx-ops vmq`` needs vmq_fx's
onnxruntime library (``--custom-op-library``).

Prints one line per image: the path, then the ``K`` best classes as ``index:name:probability``, tab-separated.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def preprocess(path: str, cfg: dict) -> np.ndarray:
    """One image as the model was evaluated: convert, resize the shorter side to ``resize_size``, center-crop
    ``input_size``, scale to [0, 1], normalize. ``[C, S, S]`` float32 (the arithmetic of torchvision's transforms)."""
    channels, size, _ = cfg["input_size"]
    image = Image.open(path).convert("RGB" if channels == 3 else "L")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    resize = cfg.get("resize_size", math.floor(size / cfg["crop_pct"]))
    if short != resize:
        new_long = int(resize * long / short)
        image = image.resize((resize, new_long) if w <= h else (new_long, resize), _RESAMPLE[cfg["interpolation"]])
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).astype(np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (x - mean) / std


def session(path: str, threads: int | None, library: str | None) -> tuple[ort.InferenceSession, dict]:
    """The onnxruntime session for ``path`` and the preprocessing its metadata records."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if library:
        opts.register_custom_ops_library(library)
    try:
        run = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors are long: its first line names the problem
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not library and "vmq" in reason:  # an operator of vmq_fx's custom domain
            sys.exit(f"{path} uses vmq_fx's custom ops (domain vmq): give vmq_fx's onnxruntime library with "
                     "--custom-op-library (`python -m vmq_fx.export.ort_ops --build` prints its path)")
        sys.exit(f"{path}: onnxruntime cannot load it: {reason[:300]}")
    meta = run.get_modelmeta().custom_metadata_map
    if "vmq_fx.pretrained_cfg" not in meta:
        sys.exit(f"{path}: no vmq_fx.pretrained_cfg in the file's metadata (the preprocessing): export the model "
                 "again with this version of vmq_fx")
    return run, json.loads(meta["vmq_fx.pretrained_cfg"])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ONNX file exported by vmq_fx (vmq export-onnx / vmq quantize)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top", type=int, default=1, help="classes shown per image (default 1)")
    p.add_argument("--batch", type=int, default=32, help="images per run (default 32)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--custom-op-library", help="the onnxruntime library a file with custom ops needs")
    args = p.parse_args(argv)
    if args.top < 1 or args.batch < 1:
        p.error("--top and --batch must be at least 1")
    run, cfg = session(args.model, args.threads, args.custom_op_library)
    names = cfg.get("label_names")
    input_name = run.get_inputs()[0].name
    for start in range(0, len(args.images), args.batch):
        paths = args.images[start:start + args.batch]
        try:
            x = np.stack([preprocess(path, cfg) for path in paths])
        except OSError as e:
            sys.exit(f"cannot read image: {e}")
        probs = softmax(run.run(None, {input_name: x})[0].astype(np.float64))
        for path, row in zip(paths, probs):
            best = np.argsort(-row, kind="stable")[:args.top]
            cells = [f"{i}:{names[i] if names else i}:{row[i]:.4f}" for i in best]
            print("\t".join([path, *cells]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
