"""PTQ4VM accuracy table on the shipped reference models (full Fashion-MNIST test set, CPU).

    python bench/ptq4vm_accuracy.py [--models vim-fm-tiny vmamba-fm-tiny] [--jlss-steps N] [--jlss-batch N]
        [--vmamba-jlss-steps N] [--vmamba-jlss-batch N] [--threads N] [--out ...]

For every model: FP, then W8A8 / W6A6 / W4A8 / W4A4 for
  per-tensor static (min-max) | per-token dynamic | SmoothQuant + PTS | PTQ4VM (PTS + JLSS) | PTQ4VM learning all
  projections (x_proj / dt_proj too).
Accuracy is measured on the convert_pt2e graph (the Q/DQ reference). For PTQ4VM at W8A8 and W4A8 the lowered
integer model (vmq::int8_linear) is evaluated as well and compared with the fake-quantized prepared model.
The table is rewritten after every row, so an interrupted run still leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line, test_set, top1  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import Schedule, VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes  # noqa: E402
from vmq_fx.data import calibration_images  # noqa: E402
from vmq_fx.evaluate import predict  # noqa: E402
from vmq_fx.joint_learning import resolved_schedule  # noqa: E402
from vmq_fx.models import load_reference  # noqa: E402

BITS = [(8, 8), (6, 6), (4, 8), (4, 4)]
METHODS = [
    ("per-tensor static", lambda w, a: recipes.per_tensor_static(w, a), None),
    ("per-token dynamic", lambda w, a: recipes.per_token_dynamic(w, a), None),
    ("SmoothQuant + PTS", lambda w, a: recipes.smoothquant_pts(w, a), None),
    ("PTQ4VM (PTS + JLSS)", lambda w, a: recipes.ptq4vm(w, a), False),
    ("PTQ4VM, all projections", lambda w, a: recipes.ptq4vm(w, a, learn_all_projections=True), True),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-tiny", "vmamba-fm-tiny"])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--jlss-steps", type=int, default=None, help="default: PTQ4VM's (Vim 100, VMamba 400)")
    p.add_argument("--jlss-batch", type=int, default=None, help="images per JLSS step (default: all)")
    p.add_argument("--vmamba-jlss-steps", type=int, default=None, help="override --jlss-steps for VMamba models")
    p.add_argument("--vmamba-jlss-batch", type=int, default=None, help="override --jlss-batch for VMamba models")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", default="bench/results/ptq4vm_accuracy.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x_test, labels = test_set(args.limit)
    calib = calibration_images(args.calib)
    jcfg = Schedule(steps=args.jlss_steps, batch_size=args.jlss_batch)
    vmamba_jcfg = Schedule(
        steps=args.vmamba_jlss_steps if args.vmamba_jlss_steps is not None else args.jlss_steps,
        batch_size=args.vmamba_jlss_batch if args.vmamba_jlss_batch is not None else args.jlss_batch)

    def schedule(cfg: Schedule, family: str) -> str:
        steps = resolved_schedule(cfg, family, "jlss")[0]
        return f"{family}: {steps} steps per block on {cfg.batch_size or 'all'} images per step"
    rows, notes = [], []
    header = [
        "# PTQ4VM accuracy on the Fashion-MNIST reference models", "",
        f"Machine: {machine_line()}. Command: `python bench/ptq4vm_accuracy.py "
        f"{shlex.join(sys.argv[1:])}`.",
        f"Top-1 on {len(labels)} test images (convert_pt2e Q/DQ graph); {args.calib} calibration images from the "
        f"training split (seed 0). JLSS ({schedule(jcfg, 'vim')}; {schedule(vmamba_jcfg, 'vmamba')}; PTQ4VM's "
        "schedule is Vim 100 / VMamba 400 steps on all 256 images). Quantization time: calibration + JLSS + convert, "
        "this CPU.", "",
        "| model | method | bits | top-1 % | delta vs FP | quantization s |", "|---|---|---|---|---|---|",
    ]

    def write():
        body = header + rows + ([""] + notes if notes else [])
        Path(args.out).write_text("\n".join(body) + "\n")

    for name in args.models:
        model = load_reference(name)
        fp = top1(predict(model, x_test), labels)
        rows.append(f"| {name} | FP32 | - | {fp:.2f} | - | - |")
        write()
        print(rows[-1], flush=True)
        gm = vmq_fx.export_model(model, x_test[:2]).module()
        cfg = vmamba_jcfg if type(model).__name__ == "VMamba" else jcfg
        for method, make, learn_all in METHODS:
            for w, a in BITS:
                t0 = time.perf_counter()
                prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(make(w, a)))
                vmq_fx.calibrate(prepared, calib, progress=False)
                if learn_all is not None:
                    vmq_fx.jlss(prepared, calib, cfg, progress=False)
                fq_logits = predict(prepared, x_test) if learn_all is False and a == 8 else None
                quantized = convert_pt2e(prepared)
                secs = time.perf_counter() - t0
                acc = top1(predict(quantized, x_test), labels)
                rows.append(f"| {name} | {method} | W{w}A{a} | {acc:.2f} | {acc - fp:+.2f} | {secs:.0f} |")
                write()
                print(rows[-1], flush=True)
                if fq_logits is not None:
                    low_logits = predict(vmq_fx.lower(quantized), x_test)
                    agree = 100.0 * (low_logits.argmax(-1) == fq_logits.argmax(-1)).float().mean().item()
                    rel = ((low_logits - fq_logits).norm() / fq_logits.norm()).item()
                    notes.append(f"- {name} PTQ4VM W{w}A{a} lowered to vmq::int8_linear: top-1 "
                                 f"{top1(low_logits, labels):.2f}%, same prediction as the fake-quantized prepared "
                                 f"model on {agree:.2f}% of images, logits relative error {rel:.2e}.")
                    write()
                    print(notes[-1], flush=True)


if __name__ == "__main__":
    main()
