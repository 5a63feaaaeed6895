"""Every CPU kernel build this machine runs, side by side: the scan, the causal convolution and the integer linear's
product paths, at Vim-T shapes, one thread, in one process.

    python bench/cpu_isas.py [--reps 5] [--emulate-avx2] [--note '...'] [--out bench/results/cpu_isas.md]

The builds are those of ``vmq_fx.ops.native.executable_isas()`` from the selected one down (``--emulate-avx2``: from
avx2 down, with ATen, oneDNN and MKL capped at AVX2 as well; set before torch loads, so the script re-runs itself).
Variants are interleaved round by round (medians of 3 rounds of ``--reps`` runs; a build is switched to before its
block of runs, outside the timing); ratios are within a row.

* scan: ``vmq::selective_scan`` (d_inner 384, L 197, N 16, D, z, delta bias, softplus), forward at batch 1 and 8 and
  forward + backward at batch 8; state updates per second.
* conv: ``vmq::causal_conv1d`` (batch 8, L 197, 768 channels, 4 taps, SiLU).
* linears: fp32 ``F.linear`` against ``vmq::int8_linear`` (W8A8) on every product path each build runs here
  (``native.INT8_GEMM_PATHS``: ``torch._int_mm``, the kernel's own ``vpdpbusd`` and AMX products, the int16 product, the
  fp32 GEMM on the levels), Vim-T's in_proj (192 -> 768) and out_proj (384 -> 192) at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import AVX2_CAPS, interleaved, machine_line, scan_inputs  # noqa: E402

SCAN = dict(dim=384, length=197, n=16)


def scan_case(batch, backward):
    import torch

    from vmq_fx.ops import selective_scan_fn

    args = scan_inputs(batch, **SCAN)
    if backward:
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        return lambda: selective_scan_fn(**leaves, delta_softplus=True).sum().backward()

    def fwd():
        with torch.no_grad():
            selective_scan_fn(**args, delta_softplus=True)
    return fwd


def run(args) -> list[str]:
    import torch
    import torch.nn.functional as F

    from vmq_fx.ops import native
    from vmq_fx.ops.int8_linear import prepare_weight

    torch.set_num_threads(1)
    isas = native.executable_isas()
    isas = isas[isas.index(native.selected_isa()):]

    def on(isa, gemm=None):  # entered around each block of runs: switching builds is not timed
        return lambda: native.use_isa(isa, int8_gemm=gemm)

    out = [f"Machine: {machine_line()}. Command: `python bench/cpu_isas.py {shlex.join(sys.argv[1:])}`. "
           f"{args.note}".rstrip(), "",
           "### Selective scan (Vim-T: d_inner 384, L 197, N 16), ms and G state updates / s", "",
           "| pass | batch | " + " | ".join(isas) + " |", "|---|---|" + "---|" * len(isas)]
    for batch, backward in ((1, False), (8, False), (8, True)):
        fn = scan_case(batch, backward)
        t = interleaved({isa: fn for isa in isas}, args.reps, around={isa: on(isa) for isa in isas})
        updates = batch * SCAN["dim"] * SCAN["length"] * SCAN["n"]
        out.append(f"| {'fwd+bwd' if backward else 'fwd'} | {batch} | "
                   + " | ".join(f"{t[i] * 1e3:.2f} ({updates / t[i] / 1e9:.2f})" for i in isas) + " |")
        print(out[-1], file=sys.stderr, flush=True)
    x = torch.randn(8, 197, 768)
    w, b = torch.randn(768, 4), torch.randn(768)
    t = interleaved({isa: lambda: torch.ops.vmq.causal_conv1d(x, w, b, True, False) for isa in isas}, args.reps,
                    around={isa: on(isa) for isa in isas})
    out += ["", "### Causal convolution + SiLU (batch 8, L 197, 768 channels, 4 taps), ms", "",
            "| " + " | ".join(isas) + " |", "|" + "---|" * len(isas),
            "| " + " | ".join(f"{t[i] * 1e3:.2f}" for i in isas) + " |"]
    builds = [(i, g) for i in isas for g in native.INT8_GEMM_PATHS if native.int8_gemm_runs(g, i)]
    out += ["", "### W8A8 linear: fp32 F.linear / vmq::int8_linear per build and product path (ms; speed-up over fp32)",
            "", "| layer (K -> N) | batch | fp32 | " + " | ".join(f"{i} {g}" for i, g in builds) + " |",
            "|---|---|---|" + "---|" * len(builds)]
    g = torch.Generator().manual_seed(0)
    for name, k, n in (("in_proj", 192, 768), ("out_proj", 384, 192)):
        wq, w_sum = prepare_weight(torch.randint(-127, 128, (n, k), generator=g))
        a = (None, torch.rand(197, generator=g) * 0.05 + 0.01, torch.randint(0, 256, (197,), generator=g,
             dtype=torch.int32), wq, torch.rand(n, generator=g) * 1e-2, w_sum, None, 0, 255, 8)
        wf = torch.randn(n, k, generator=g)
        for batch in (1, 8):
            xx = torch.randn(batch, 197, k, generator=g)
            variants, around = {"fp32": lambda xx=xx: F.linear(xx, wf)}, {}
            for isa, gemm in builds:
                variants[f"{isa} {gemm}"] = lambda xx=xx, a=a: torch.ops.vmq.int8_linear(xx, *a)
                around[f"{isa} {gemm}"] = on(isa, gemm)
            with torch.no_grad():
                t = interleaved(variants, args.reps, around=around)
            out.append(f"| {name} ({k} -> {n}) | {batch} | {t['fp32'] * 1e3:.2f} | "
                       + " | ".join(f"{t[v] * 1e3:.2f} ({t['fp32'] / t[v]:.2f}x)" for v in variants if v != "fp32")
                       + " |")
            print(out[-1], file=sys.stderr, flush=True)
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in native.ONEDNN_CAPS_WITHOUT_INT8_DOT:
        out += ["", "With oneDNN capped below VNNI, its `torch._int_mm` uses saturating 16-bit pair sums: the int_mm "
                "columns are fast here but their results are wrong (test_int8_linear), which is why "
                "`int8_gemm_path` never picks them; on a real AVX2-only CPU oneDNN's `_int_mm` was exact and 32x "
                "slower than fp32."]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--emulate-avx2", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--out", default="bench/results/cpu_isas.md")
    args = p.parse_args()
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_CAPS}))
    from _util import cpu_class, write_class_section

    section = [f"## {cpu_class()}", "", *run(args), ""]
    write_class_section(args.out, "# CPU kernels per build\n\nOne section per CPU class measured; a re-run replaces "
                        "its own class's section.", section)
    print("\n".join(section))


if __name__ == "__main__":
    main()
