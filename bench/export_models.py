"""torch.export of the full-size configurations: scan node counts, export time, eager vs exported.

    python bench/export_models.py [--out bench/results/export.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line  # noqa: E402

from vmq_fx.export import export_model  # noqa: E402
from vmq_fx.models import create_model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/export.md")
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vmambav2v_tiny", "vim_fm_tiny", "vmamba_fm_tiny"])
    args = p.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        cfg = model.config
        x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
        t0 = time.perf_counter()
        ep = export_model(model, x)
        export_s = time.perf_counter() - t0
        x3 = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size)  # another batch size than traced
        with torch.no_grad():
            ref, out = model(x3), ep.module()(x3)
        scans = sum(n.target is torch.ops.vmq.selective_scan.default for n in ep.graph.nodes)
        linears = sum(n.target is torch.ops.aten.linear.default for n in ep.graph.nodes)
        params = sum(q.numel() for q in model.parameters()) / 1e6
        rows.append((name, f"{cfg.img_size}x{cfg.img_size}", f"{params:.1f}", scans, linears, f"{export_s:.1f}",
                     f"{(out - ref).abs().max().item():.2g}"))
        print(rows[-1], flush=True)
    lines = ["# torch.export of Vim and VMamba", "",
             f"Machine: {machine_line()}. Command: `python bench/export_models.py`. Dynamic batch traced at 2, "
             "checked at 3.", "",
             "| model | input | params (M) | vmq.selective_scan nodes | aten.linear nodes | export s | "
             "max abs(eager - exported) |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
