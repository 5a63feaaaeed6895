"""Saving and loading lowered models: ``load_quantized`` (the graph stored in the file) against ``torch.export`` of the
model alone, a lower bound of rebuilding the graph by tracing (export -> prepare -> placeholder parameters -> convert ->
lower: what loading did before the graph was stored in the file; 3.2-3.5 s for vim-fm-tiny).

    python bench/load_time.py --threads 1     # -> bench/results/load_time.md

The models are quantized with few random calibration images (the graph's structure and the file's size do not depend
on the calibration data); vim_tiny / vmambav2v_tiny at 224^2 have random weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import vmq_fx  # first: it quiets torchao's import-time messages
import torch
from safetensors import safe_open

from _util import machine_line

RECIPES = ("sq-pts-w8a8", "vq-kmeans-2bit")


def _seconds(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _model(name: str):
    if name in vmq_fx.models.list_references():
        return vmq_fx.models.load_reference(name)
    return vmq_fx.models.create_model(name).eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-tiny", "vmamba-fm-tiny", "vim_tiny"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_time.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    lines = ["# Loading a saved quantized model", "", f"`python bench/load_time.py --threads {args.threads}`; "
             f"{machine_line()}; medians of {args.reps}. *export* is `torch.export` of the float model alone, a lower "
             "bound of rebuilding the lowered graph by tracing (export + prepare + convert + lower), which is what "
             "`load_quantized` did before the graph was stored in the file.", "",
             "| model | recipe | file MiB | of it, stored graph KiB | save s | load s | export s | export / load |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = _model(name)
        c = model.config
        calib = torch.randn(4, c.in_chans, c.img_size, c.img_size)
        for recipe_name in RECIPES:
            recipe = vmq_fx.recipes.from_name(recipe_name)
            lowered = vmq_fx.quantize(model, recipe, calib, progress=False).lowered
            path = work / f"{name}_{recipe_name}.safetensors"
            save_s, _ = _seconds(lambda: vmq_fx.save_quantized(lowered, path, c), args.reps)
            load_s, loaded = _seconds(lambda: vmq_fx.load_quantized(path), args.reps)
            with torch.no_grad():
                assert torch.equal(loaded(calib[:2]), lowered(calib[:2])), "the loaded model computes otherwise"

            trace_s, _ = _seconds(lambda: vmq_fx.export_model(model, calib[:2]), args.reps)
            with safe_open(str(path), framework="pt") as f:
                graph_kib = len(f.metadata()["graph"]) / 1024
            lines.append(f"| {name} | {recipe_name} | {os.path.getsize(path) / 2**20:.2f} | {graph_kib:.0f} | "
                         f"{save_s:.2f} | {load_s:.3f} | {trace_s:.2f} | {trace_s / load_s:.0f}x |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
