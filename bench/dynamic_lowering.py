"""Per-token dynamic quantization, lowered: does the lowered model classify as its Q/DQ graph does?

For each shipped reference model and bit width: prepare, calibrate (weights only: the activations need none), convert
(the Q/DQ graph: torchao's choose_qparams_affine -> quantize_affine -> dequantize_affine per linear), lower (each
linear one ``vmq::int8_linear`` computing its rows' parameters at run time), and the lowered model's ONNX file in
onnxruntime; top-1 of all three on the 10,000 Fashion-MNIST test images and the number of images whose top-1 differs
from the Q/DQ graph's (target: at most 2 of 10,000).

    python bench/dynamic_lowering.py [--out bench/results/dynamic_lowering.md]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line  # noqa: E402

import torch  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes  # noqa: E402
from vmq_fx.app.data import calibration_images, fashion_mnist, normalize  # noqa: E402
from vmq_fx.export import ort_session  # noqa: E402


def predictions(fn, images, batch=500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/dynamic_lowering.md")
    args = p.parse_args()
    pixels, labels = fashion_mnist("test")
    images = normalize(pixels)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name in vmq_fx.models.list_references():
        model = vmq_fx.models.load_reference(name)
        calib = calibration_images(8)
        for w_bits, a_bits in ((8, 8), (4, 4)):
            t0 = time.perf_counter()
            prepared = prepare_pt2e(vmq_fx.export_model(model, calib[:2]).module(),
                                    VisualMambaQuantizer(recipes.per_token_dynamic(w_bits, a_bits)))
            vmq_fx.calibrate(prepared, calib, progress=False)
            qdq = convert_pt2e(prepared)
            ref = predictions(qdq, images)
            lowered = vmq_fx.lower(qdq)
            low = predictions(lowered, images)
            path = vmq_fx.export_onnx(lowered, images[:2], tmp / f"{name}_{w_bits}{a_bits}.onnx").path
            session = ort_session(path)
            feed = session.get_inputs()[0].name
            ort = predictions(lambda x: torch.from_numpy(session.run(None, {feed: x.numpy()})[0]), images)
            top1 = [f"{100 * float((p == labels).float().mean()):.2f}" for p in (ref, low, ort)]
            rows.append(f"| {name} | W{w_bits}A{a_bits} | {' | '.join(top1)} | {int((low != ref).sum())} | "
                        f"{int((ort != ref).sum())} | {time.perf_counter() - t0:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join([
        "# Per-token dynamic quantization: lowered model and ONNX file against the Q/DQ graph", "",
        f"Machine: {machine_line()}. Command: `python bench/dynamic_lowering.py {shlex.join(sys.argv[1:])}`. "
        "Nothing else ran.", "",
        "Fashion-MNIST test set (10,000 images); the Q/DQ graph is `convert_pt2e`'s (torchao's dynamic Q/DQ ops), the "
        "lowered model runs `vmq::int8_linear` with run-time per-token parameters, the ONNX file is the lowered "
        "model's (standard ops) in onnxruntime. No calibration seeds: the method has no calibration.", "",
        "| model | bits | top-1 % Q/DQ | top-1 % lowered | top-1 % onnxruntime | images lowered != Q/DQ | "
        "images onnxruntime != Q/DQ | s |",
        "|---|---|---|---|---|---|---|---|", *rows, ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
