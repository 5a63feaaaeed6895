"""The lowered W8A8 model on each integer-product path of ``vmq::int8_linear`` this CPU runs exactly, against FP32, in
one process: what ``vmq_fx.ops.native.int8_gemm_path``'s choice is worth end to end.

    python bench/int8_gemm_paths.py [--rounds 7] [--note '...'] [--out bench/results/int8_gemm_paths.md]

vim_tiny 224x224 with random weights, SmoothQuant + PTS W8A8 calibrated on 8 random images, batch 1 and 8, one
thread. The paths: ``int_mm`` (``torch._int_mm``), ``onednn`` (oneDNN's matmul primitive for the large products, the
rest on ``_int_mm``) and ``float`` (the fp32 GEMM on the dequantized levels); the first two only where the CPU has int8
dot products (VNNI / AMX; without them ``_int_mm`` is many times slower, or wrong under a capped oneDNN). Each path is
switched to before its block of runs, outside the timing; variants are interleaved over ``--rounds`` rounds and the
medians reported. The results file keeps one section per CPU class; a run replaces its own class's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import cpu_class, interleaved, machine_line, write_class_section  # noqa: E402


def main():
    import vmq_fx
    from vmq_fx import recipes
    from vmq_fx.ops import native

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--note", default="")
    p.add_argument("--out", default="bench/results/int8_gemm_paths.md")
    args = p.parse_args()
    kernels = native.kernels()
    if kernels is None:
        sys.exit("int8_gemm_paths: the vmq_fx CPU kernels are not available here (see the log above)")
    torch.set_num_threads(1)
    dot = native.INT8_DOT_FLAGS & native._cpu_flags()
    paths = [g for g in native.INT8_GEMM_PATHS if g == "float" or dot]
    chosen = native.int8_gemm_path()[0]
    torch.manual_seed(0)
    model = vmq_fx.models.create_model("vim_tiny").eval()
    calib = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lowered = vmq_fx.quantize(model, recipes.smoothquant_pts(8, 8), calib, progress=False).lowered

    def on(path):
        return lambda: native.use_isa(kernels.isa, int8_gemm=path)

    lines = [f"## {cpu_class()}", "",
             f"Machine: {machine_line()}. Command: `python bench/int8_gemm_paths.py {shlex.join(sys.argv[1:])}`. "
             f"{args.note}".rstrip(), "",
             f"vim_tiny 224x224, lowered W8A8 (SmoothQuant + PTS), one thread, medians of {args.rounds} interleaved "
             f"rounds; ratio = FP32 / variant. `int8_gemm_path` chooses `{chosen}` here.", "",
             "| batch | FP32 ms | " + " | ".join(f"W8A8, {g}" for g in paths) + " |", "|---|---|" + "---|" * len(paths)]
    for batch, reps in ((1, 5), (8, 2)):
        x = torch.randn(batch, 3, 224, 224)
        variants = {"FP32": lambda: model(x), **{g: (lambda: lowered(x)) for g in paths}}
        with torch.no_grad():
            t = interleaved(variants, reps, rounds=args.rounds, around={g: on(g) for g in paths})
        lines.append(f"| {batch} | {t['FP32'] * 1e3:.1f} | "
                     + " | ".join(f"{t[g] * 1e3:.1f} ({t['FP32'] / t[g]:.2f}x)" for g in paths) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    write_class_section(args.out, "# vmq::int8_linear's product paths, end to end\n\nOne section per CPU class "
                        "measured; a re-run replaces its own class's section.", lines + [""])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
