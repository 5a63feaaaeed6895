"""Calibration and JLSS under ``torchrun``: one process against N, one thread each.

* Calibration speed: SmoothQuant + PTS W8A8 calibration (both passes and the range searches) of vim_tiny 224² on 256
  images, timed between barriers in the processes (``vmq_fx.calibrate`` alone: no start-up, no export).
* JLSS memory: the peak resident memory of each process (``ru_maxrss``) through calibration and one JLSS step per
  block on all the images (PTQ4VM's schedule: every step sees every image), on a 2-block vim_tiny 224² and 256 images;
  the largest over the processes, and its growth during JLSS (over the peak the process had reached before it: torch,
  the model, calibration). Four cases:
  - the images as one tensor every process holds whole (what a Python caller passing a tensor does), with glibc's
    malloc and torch's pages as they come;
  - the images as a map-style dataset each process reads only its share of (what the CLI does with a folder of
    images), with malloc and pages as they come;
  - the same after ``vmq_fx.pt2e.memory.return_freed_memory()``: glibc raises its mmap threshold each time a large
    block is freed, so later large tensors come from its heap and their memory stays with the process after they are
    freed, while a fixed threshold maps each one anew (a page fault per page);
  - the same with ``huge_pages_for_large_tensors()`` besides (what the CLI does), one page fault per 2 MiB.
  JLSS's time is reported beside the memory for that reason (one run: indicative only).

Random images (the work does not depend on their content) and random weights in the official layout.

    python bench/distributed_calibration.py [--procs 2] [--rounds 3] [--tables calibration memory] [--note '...']
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import launch_command, machine_line  # noqa: E402


def worker(task: str, data: str, malloc: str) -> None:
    """One process of a run (alone, or one of torchrun's): prints a JSON line on rank 0."""
    import torch

    import vmq_fx
    from vmq_fx import VisualMambaQuantizer, distributed, prepare_pt2e, recipes

    if malloc == "cli":  # before any tensor is made
        assert vmq_fx.pt2e.memory.huge_pages_for_large_tensors()
    if malloc in ("return-freed", "cli"):
        assert vmq_fx.pt2e.memory.return_freed_memory()
    torch.set_num_threads(1)
    distributed.init_from_env()
    torch.manual_seed(0)
    depth, count = (24, 256) if task == "calibrate" else (2, 256)
    model = vmq_fx.models.create_model("vim_tiny", depth=depth).eval()

    class SeededImages(torch.utils.data.Dataset):
        """Random images, image ``i`` drawn with seed ``i`` when it is read (as a file would be)."""

        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(i))

    images = SeededImages() if data == "dataset" else torch.randn(count, 3, 224, 224,
                                                                  generator=torch.Generator().manual_seed(0))
    recipe = recipes.smoothquant_pts(8, 8) if task == "calibrate" else recipes.ptq4vm(8, 8)
    example = vmq_fx.pt2e.utils.example_images(images, 2)
    prepared = prepare_pt2e(vmq_fx.export_model(model, example).module(), VisualMambaQuantizer(recipe))
    barrier = (lambda: torch.distributed.barrier()) if distributed.world_size() > 1 else (lambda: None)
    barrier()
    t0 = time.perf_counter()
    vmq_fx.calibrate(prepared, images, batch_size=16, progress=False)
    barrier()
    seconds = time.perf_counter() - t0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if task == "jlss":
        barrier()
        t0 = time.perf_counter()
        vmq_fx.jlss(prepared, images, vmq_fx.JLSSConfig(steps=1), progress=False)
        barrier()
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = distributed.all_gather_objects((before, peak))
    if distributed.is_main():
        print(json.dumps({"seconds": seconds, "peak_before_gib": max(p[0] for p in peaks),
                          "peak_gib": max(p[1] for p in peaks)}))
    distributed.shutdown()


DATA = {"tensor": "one tensor, whole in every process", "dataset": "dataset, each process reads its share"}
MALLOC = {"glibc": "as they come", "return-freed": "`return_freed_memory()`",
          "cli": "`return_freed_memory()` + `huge_pages_for_large_tensors()` (the CLI)"}
CASES = [("tensor", "glibc"), ("dataset", "glibc"), ("dataset", "return-freed"), ("dataset", "cli")]


def run(task: str, procs: int, data: str = "tensor", malloc: str = "glibc") -> dict:
    me = [str(Path(__file__).resolve()), "--worker", task, "--data", data, "--malloc", malloc]
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")}
    done = subprocess.run(launch_command(procs, me), capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--out", default="bench/results/distributed_calibration.md")
    p.add_argument("--worker", choices=("calibrate", "jlss"), help=argparse.SUPPRESS)
    p.add_argument("--data", choices=tuple(DATA), default="tensor", help=argparse.SUPPRESS)
    p.add_argument("--malloc", choices=tuple(MALLOC), default="glibc", help=argparse.SUPPRESS)
    p.add_argument("--tables", nargs="+", choices=("calibration", "memory"), default=["calibration", "memory"])
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.malloc)
        return
    counts = (1, args.procs)
    lines = ["# Calibration and JLSS under torchrun", "",
             f"Machine: {machine_line()}. Command: `python bench/distributed_calibration.py "
             f"{shlex.join(sys.argv[1:])}`. {args.note}".rstrip(), "", "One thread per process (gloo).", ""]
    if "calibration" in args.tables:
        calib = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                calib[n].append(run("calibrate", n)["seconds"])
                print("calibrate", n, calib[n][-1], file=sys.stderr, flush=True)
        med = {n: statistics.median(v) for n, v in calib.items()}
        lines += ["## Calibration", "",
                  "SmoothQuant + PTS W8A8 of vim_tiny 224² on 256 random images in batches of 16, `vmq_fx.calibrate` "
                  f"timed between barriers, medians of {args.rounds} interleaved runs.", "",
                  "| processes | calibration s | speed-up |", "|---|---|---|"]
        lines += [f"| {n} | {med[n]:.1f} | {med[1] / med[n]:.2f}x |" for n in counts]
        lines.append("")
    if "memory" in args.tables:
        lines += ["## JLSS memory", "",
                  "The largest peak resident memory of the processes through calibration and one JLSS step per block "
                  "on all 256 images, a 2-block vim_tiny 224² (one run each), how much it grew during JLSS, and "
                  "JLSS's time between barriers (one run: indicative only).", "",
                  "| images | malloc, pages | processes | peak memory per process GiB | vs one process | growth during "
                  "JLSS GiB | vs one process | JLSS s |", "|---|---|---|---|---|---|---|---|"]
        for data, malloc in CASES:
            jlss = {n: run("jlss", n, data, malloc) for n in counts}
            print("jlss", data, malloc, jlss, file=sys.stderr, flush=True)
            peak = {n: r["peak_gib"] for n, r in jlss.items()}
            growth = {n: r["peak_gib"] - r["peak_before_gib"] for n, r in jlss.items()}
            lines += [f"| {DATA[data]} | {MALLOC[malloc]} | {n} | {peak[n]:.2f} | {peak[n] / peak[1]:.2f}x | "
                      f"{growth[n]:.2f} | {growth[n] / growth[1]:.2f}x | {jlss[n]['seconds']:.1f} |" for n in counts]
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
