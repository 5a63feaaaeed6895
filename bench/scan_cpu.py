"""CPU selective scan: vmq::selective_scan vs mamba-ssm's selective_scan_ref, same process, same inputs.

    python bench/scan_cpu.py [--out bench/results/scan_cpu.md]

Shapes are Vim-T's: batch 8, d_inner 384, L 197, N 16 (one direction of one block), with D, z and delta_bias,
softplus on, as Vim calls it. Also VMamba-style grouped B/C (4 directions). Medians of 7 runs after 2 warm-ups.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line, mamba_ssm_ref, median_seconds  # noqa: E402

from vmq_fx.ops import selective_scan_fn  # noqa: E402


def inputs(batch, dim, length, n, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (lambda: r(batch, n, length)) if groups is None else (lambda: r(batch, groups, n, length))
    return dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length), A=-(torch.rand(dim, n, generator=g) + .2),
                B=bc(), C=bc(), D=r(dim), z=r(batch, dim, length), delta_bias=r(dim))


def time_case(fn, args, backward):
    if not backward:
        with torch.no_grad():
            return median_seconds(lambda: fn(**args, delta_softplus=True))
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}

    def step():
        out = fn(**leaves, delta_softplus=True)
        out.sum().backward()

    return median_seconds(step)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/scan_cpu.md")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--note", default="", help="measurement conditions to record in the table header")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = mamba_ssm_ref()
    cases = [("Vim-T (8, 384, 197, 16)", dict(batch=8, dim=384, length=197, n=16)),
             ("VMamba grouped (8, 4x96, 196, 8)", dict(batch=8, dim=384, length=196, n=8, groups=4))]
    rows = []
    for label, shape in cases:
        a = inputs(**shape)
        out, want = selective_scan_fn(**a, delta_softplus=True), ref(**a, delta_softplus=True)
        err = ((out - want).norm() / want.norm()).item()
        for backward in (False, True):
            t_ours = time_case(selective_scan_fn, a, backward)
            t_ref = time_case(ref, a, backward)
            rows.append((label, "fwd+bwd" if backward else "fwd", t_ref * 1e3, t_ours * 1e3, t_ref / t_ours, err))
            print(rows[-1], flush=True)
    lines = [
        "# CPU selective scan: vmq::selective_scan vs mamba-ssm selective_scan_ref",
        "",
        f"Machine: {machine_line()}. Command: `python bench/scan_cpu.py {shlex.join(sys.argv[1:])}`. Medians of 7 "
        f"runs, both implementations in the same process. {args.note}",
        "",
        "| shape (batch, d_inner, L, N) | pass | selective_scan_ref ms | vmq ms | speed-up | rel. error vs ref |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c:.1f} | {d:.1f} | {e:.2f}x | {f:.1e} |" for a, b, c, d, e, f in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
