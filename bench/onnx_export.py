"""ONNX export of the shipped reference models, FP32 and quantized, run in onnxruntime (CPU).

    python bench/onnx_export.py [--models vim-fm-tiny vmamba-fm-tiny] [--vq-steps N] [--threads N] [--out ...]

Per model and variant: ONNX file size, export time, onnxruntime CPU latency (median) at batch 1 and 64 with the
ratio to FP32 of the same run, top-1 on the full test set in onnxruntime and in torch. Variants: FP32; W8A8 and
W4A8 (SmoothQuant + per-token static, calibrated, no JLSS: the file and the kernels are the same with JLSS) lowered
to vmq::int8_linear; ViM-VQ 3-bit and 2-bit lowered to vmq::vq_linear.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line, median_seconds, test_set, top1  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes  # noqa: E402
from vmq_fx.app.data import calibration_images  # noqa: E402
from vmq_fx.app.evaluate import predict  # noqa: E402
from vmq_fx.export import ort_session  # noqa: E402
from vmq_fx.models import load_reference  # noqa: E402


def _variants(gm, calib, vq_config):
    yield "FP32", None
    for name, recipe in (("W8A8", recipes.smoothquant_pts(8, 8)), ("W4A8", recipes.smoothquant_pts(4, 8)),
                         ("VQ 3-bit", recipes.vimvq(3)), ("VQ 2-bit", recipes.vimvq(2))):
        prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipe))
        vmq_fx.calibrate(prepared, calib, progress=False)
        if isinstance(recipe, vmq_fx.VQRecipe):
            vmq_fx.vector_quantize(prepared, calib, vq_config, progress=False)
        yield name, vmq_fx.lower(convert_pt2e(prepared))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-tiny", "vmamba-fm-tiny"])
    p.add_argument("--vq-steps", type=int, default=None, help="ViM-VQ steps per block (default: VQConfig's)")
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: default)")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--out", default="bench/results/onnx.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x_test, labels = test_set(args.limit)
    calib = calibration_images(256)
    vq_config = vmq_fx.VQConfig() if args.vq_steps is None else vmq_fx.VQConfig(steps=args.vq_steps)
    rows = []
    header = [
        "# ONNX export and onnxruntime", "",
        f"Machine: {machine_line()}, onnxruntime {ort.__version__} (CPUExecutionProvider, "
        f"{args.threads or 'default'} intra-op threads). Command: `python bench/onnx_export.py "
        f"{shlex.join(sys.argv[1:])}`.",
        f"Latency: median of 7 runs after 2 warm-ups, same process; ratio = FP32 latency / this latency. Top-1 on "
        f"{len(labels)} test images. W8A8 / W4A8: SmoothQuant + per-token static without JLSS, lowered; VQ: ViM-VQ "
        "(vimvq recipe), lowered.", "",
        "| model | variant | file KB | vs FP32 size | export s | ORT ms b=1 | speed-up b=1 | ORT ms b=64 "
        "| speed-up b=64 | top-1 % ORT | top-1 % torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tmp = Path(tempfile.mkdtemp())
    for name in args.models:
        model = load_reference(name)
        gm = vmq_fx.export_model(model, x_test[:2]).module()
        base = {}
        for variant, lowered in _variants(gm, calib, vq_config):
            m = model if lowered is None else lowered
            res = vmq_fx.export_onnx(m, x_test[:2], tmp / f"{name}-{variant.replace(' ', '')}.onnx")
            sess = ort_session(res.path, threads=args.threads or None)
            feed = sess.get_inputs()[0].name
            lat = {b: median_seconds(lambda b=b, s=sess, f=feed: s.run(None, {f: x_test[:b].numpy()})) for b in (1, 64)}
            logits = torch.cat([torch.from_numpy(sess.run(None, {feed: chunk.numpy()})[0])
                                for chunk in x_test.split(500)])
            with torch.no_grad():
                torch_top1 = top1(predict(m, x_test), labels)
            ort_top1 = top1(logits, labels)
            if lowered is None:
                base = {"bytes": res.bytes, **lat}
            rows.append(
                f"| {name} | {variant} | {res.bytes / 1024:.0f} | {base['bytes'] / res.bytes:.2f}x smaller "
                f"| {res.seconds:.1f} | {lat[1] * 1e3:.2f} | {base[1] / lat[1]:.2f}x | {lat[64] * 1e3:.1f} "
                f"| {base[64] / lat[64]:.2f}x | {ort_top1:.2f} | {torch_top1:.2f} |")
            Path(args.out).write_text("\n".join(header + rows) + "\n")
            print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
