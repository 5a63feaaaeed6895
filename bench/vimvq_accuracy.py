"""ViM-VQ accuracy, size and cost table on the shipped reference models (full Fashion-MNIST test set, CPU).

    python bench/vimvq_accuracy.py [--models vim-fm-tiny vmamba-fm-tiny] [--bits 3 2 1] [--threads N] [--out ...]

For every model and bit width: plain k-means VQ, + convex-combination optimization (rounded at the end), + incremental
confirmation (the full method). Accuracy is measured on the lowered model (vmq::vq_linear), which computes the same
weights as the convert_pt2e graph. Bits per weight count codes, codebooks and row scales of the quantized linears;
model bytes count every tensor of the lowered model. The table is rewritten after every row.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line, test_set, top1  # noqa: E402

import torch  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes  # noqa: E402
from vmq_fx.data import calibration_images  # noqa: E402
from vmq_fx.evaluate import predict  # noqa: E402
from vmq_fx.models import load_reference  # noqa: E402

METHODS = [("k-means VQ", recipes.vq_kmeans), ("+ convex-combination opt.", recipes.vq_convex),
           ("+ incremental VQ (ViM-VQ)", recipes.vimvq)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def vq_bits_per_weight(lowered) -> float:
    """Bits of codes + codebooks + row scales per weight of the vector-quantized linears."""
    bits = weights = 0
    for node in lowered.graph.nodes:
        if node.target is torch.ops.vmq.vq_linear.default:
            codes, codebook, scale = (getattr(lowered, str(a.target)) for a in node.args[1:4])
            bits += 8 * _bytes([codes, codebook, scale])
            weights += codes.shape[0] * node.args[5]
    return bits / weights


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-tiny", "vmamba-fm-tiny"])
    p.add_argument("--bits", nargs="+", type=int, default=[3, 2, 1])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="optimization steps per block (default: the recipe's)")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", default="bench/results/vimvq_accuracy.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x_test, labels = test_set(args.limit)
    calib = calibration_images(args.calib)
    extra = {} if args.steps is None else {"steps": args.steps}
    default = recipes.vimvq(2, **extra)
    rows = []
    header = [
        "# ViM-VQ accuracy on the Fashion-MNIST reference models", "",
        f"Machine: {machine_line()}. Command: `python bench/vimvq_accuracy.py {shlex.join(sys.argv[1:])}`.",
        f"Top-1 on {len(labels)} test images, lowered model (vmq::vq_linear); {args.calib} calibration images from "
        f"the training split (seed 0). (d, k) per bit width: 3 -> (2, 64), 2 -> (4, 256), 1 -> (8, 256); n = "
        f"{default.n} candidates; {default.steps} steps per block, {default.batch_size} images per step. "
        "bits/weight: codes + codebooks (fp16) + row scales (fp16) over the weights of the quantized linears. "
        "Model bytes: every tensor of the lowered model (unquantized parts stay fp32). Time: calibration (k-means) "
        "+ optimization + convert; peak RSS: the process while vector_quantize ran.", "",
        "| model | method | bits | top-1 % | delta vs FP | bits/weight (incl. codebooks) | model bytes | vs FP32 "
        "| vs FP16 | quantization s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def write():
        Path(args.out).write_text("\n".join(header + rows) + "\n")

    for name in args.models:
        model = load_reference(name)
        fp = top1(predict(model, x_test), labels)
        fp32 = _bytes(list(model.parameters()) + list(model.buffers()))
        rows.append(f"| {name} | FP32 | 32 | {fp:.2f} | - | 32 | {fp32:,} | 1.00x | 2.00x | - | - |")
        write()
        print(rows[-1], flush=True)
        gm = vmq_fx.export_model(model, x_test[:2]).module()
        for bits in args.bits:
            for method, make in METHODS:
                t0 = time.perf_counter()
                prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(make(bits, **extra)))
                vmq_fx.calibrate(prepared, calib, progress=False)
                report = vmq_fx.vector_quantize(prepared, calib, progress=False)
                lowered = vmq_fx.lower(convert_pt2e(prepared))
                secs = time.perf_counter() - t0
                acc = top1(predict(lowered, x_test), labels)
                size = _bytes(lowered.state_dict().values())
                rows.append(
                    f"| {name} | {method} | {bits} | {acc:.2f} | {acc - fp:+.2f} | {vq_bits_per_weight(lowered):.2f} "
                    f"| {size:,} | {fp32 / size:.2f}x smaller | {fp32 / 2 / size:.2f}x smaller | {secs:.0f} "
                    f"| {report.peak_rss_bytes / 2**20:.0f} |")
                write()
                print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
