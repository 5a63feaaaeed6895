"""Whole models on a CUDA GPU: FP16 and FP32 eager against the lowered W8A8 and VQ 2-bit models, in torch, and
``torch.compile`` of each where it works.

    python bench/gpu_models.py [--models vim_base vmambav2v_base] [--batches 1 64 256] [--compile] [--out F.md]
    python bench/gpu_models.py --smoke      # tiny models and shapes on CPU: checks the script runs, no timings

Random weights (the speed does not depend on them); each model is quantized on the CPU (8 random images; the
recipes of the CPU tables: ``smoothquant_pts(8, 8)``, ``vq_kmeans(2, kmeans_iters=3)``), then moved to the GPU with
``.to("cuda")``. The lowered models keep float32 activations between their ops (as lowered); FP16 is the eager model
in half precision. Times: medians of CUDA-event-timed forwards under ``torch.no_grad()`` after warm-up; peak memory:
``torch.cuda.max_memory_allocated`` around one forward. Each row is printed and written as soon as it is measured,
so a run cut short keeps what it did. Correctness first: each variant's logits against FP32 on the GPU (relative
error, top-1 agreement on the batch).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vmq_fx  # noqa: E402
from _util import median_seconds  # noqa: E402
from vmq_fx.models import create_model  # noqa: E402

RECIPES = {"W8A8": lambda: vmq_fx.recipes.smoothquant_pts(8, 8),
           "VQ 2-bit": lambda: vmq_fx.recipes.vq_kmeans(2, kmeans_iters=3)}


def _cuda_ms(fn, reps: int) -> float:
    """Median ms of ``reps`` forwards, each timed by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_base", "vmambav2v_base"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also torch.compile each variant (minutes per model)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, no timings worth reading")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu_models.py needs a GPU (or --smoke)")
    models = {"vim_fm_tiny": dict(depth=2), "vmamba_fm_tiny": {}} if args.smoke else {m: {} for m in args.models}
    batches = [2] if args.smoke else args.batches
    timer = (lambda fn, reps: 1e3 * median_seconds(fn, reps, warmup=1)) if args.smoke else _cuda_ms
    name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name()
    import triton

    rows = [f"# Whole models on {name}", "",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}. Command: `python "
            f"bench/gpu_models.py {' '.join(sys.argv[1:])}`. Median ms of {args.reps} forwards (CUDA events, "
            "no_grad); speed-up = FP16 eager / variant; rel. err and top-1 agreement against FP32 on the GPU; peak "
            "memory of one forward.", "",
            "| model | batch | variant | ms | speed-up vs FP16 | rel. err vs FP32 | top-1 agreement | peak MiB |",
            "|---|---|---|---|---|---|---|---|"]

    def emit(row: str) -> None:
        rows.append(row)
        print(row, flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(rows) + "\n")

    for model_name, kwargs in models.items():
        torch.manual_seed(0)
        model = create_model(model_name, **kwargs).eval()
        shape = (model.config.in_chans, model.config.img_size, model.config.img_size)
        calib = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        variants = {"FP32": copy.deepcopy(model).to(device), "FP16": copy.deepcopy(model).half().to(device)}
        for label, recipe in RECIPES.items():
            variants[label] = vmq_fx.quantize(model, recipe(), calib, progress=False).lowered.to(device)
        print(f"{model_name}: quantized on CPU in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.compile:
            for label in list(variants):
                try:
                    variants[f"{label}, torch.compile"] = torch.compile(variants[label])
                except Exception as e:  # noqa: BLE001 - the table says why a variant is missing
                    emit(f"| {model_name} | - | {label}, torch.compile | failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]} | - | - | - | - |")
        for batch in batches:
            x = torch.randn(batch, *shape, device=device)
            with torch.no_grad():
                ref = variants["FP32"](x).float()
                times = {}
                for label, m in variants.items():
                    xin = x.half() if label.startswith("FP16") else x

                    def forward(m=m, xin=xin):
                        return m(xin)

                    try:
                        out = forward().float()
                        times[label] = timer(forward, args.reps)
                    except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest still run
                        emit(f"| {model_name} | {batch} | {label} | failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]} | - | - | - | - |")
                        continue
                    rel = ((out - ref).norm() / ref.norm()).item()
                    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                    base = times.get("FP16")
                    speedup = f"{base / times[label]:.2f}x" if base else "-"
                    emit(f"| {model_name} | {batch} | {label} | {times[label]:.2f} | {speedup} | {rel:.1e} | "
                         f"{100 * agree:.0f} % | {_peak_mib(forward, device):.0f} |")
            del x


if __name__ == "__main__":
    main()
