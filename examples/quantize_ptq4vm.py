"""End to end: PTQ4VM W4A8 on the shipped vim-fm-tiny, from export to the lowered integer model.

    python examples/quantize_ptq4vm.py [--w-bits 4 --a-bits 8 --jlss-steps 100]
"""
import argparse

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.app.data import calibration_images
from vmq_fx.app.evaluate import evaluate
from vmq_fx.models import load_reference


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vim-fm-tiny")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--jlss-steps", type=int, default=None)
    p.add_argument("--jlss-batch", type=int, default=None)
    args = p.parse_args()
    model = load_reference(args.model)
    calib = calibration_images(256)
    gm = vmq_fx.export_model(model, calib[:2]).module()
    prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipes.ptq4vm(args.w_bits, args.a_bits)))
    vmq_fx.calibrate(prepared, calib)
    print(vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=args.jlss_steps, batch_size=args.jlss_batch)))
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    print("FP32      ", evaluate(model))
    print(f"W{args.w_bits}A{args.a_bits} int  ", evaluate(lowered))


if __name__ == "__main__":
    main()
