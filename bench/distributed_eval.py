"""``vmq eval`` under ``torchrun``: the 10,000 Fashion-MNIST test images in one process against N processes.

Each run is a fresh ``vmq eval vim-fm-tiny --threads 1`` (one process) or ``torchrun --standalone --nproc_per_node N
-m vmq_fx.app.cli eval vim-fm-tiny --threads 1`` (one thread per process), interleaved over rounds; the table gives
the medians of the evaluation's own time (what ``vmq eval`` prints: loading the data, the forward passes and, with
N processes, the gather) and of the whole command's wall time (Python, torch and the kernels' loading included), and
checks that every run printed the same top-1 count.

    python bench/distributed_eval.py [--procs 2] [--rounds 3] [--note '...']
"""
from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import launch_command, machine_line  # noqa: E402


def run(procs: int) -> tuple[float, float, str]:
    """(eval seconds, wall seconds, the printed counts) of one run."""
    cli = ["-m", "vmq_fx.app.cli", "eval", "vim-fm-tiny", "--threads", "1", "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(launch_command(procs, cli), capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    found = re.search(r"\((\d+/\d+)\) in ([\d.]+) s", done.stdout)
    return float(found.group(2)), wall, found.group(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--out", default="bench/results/distributed_eval.md")
    args = p.parse_args()
    runs: dict[int, list[tuple[float, float, str]]] = {1: [], args.procs: []}
    run(1)  # warm the kernel cache and the page cache
    for _ in range(args.rounds):
        for procs in runs:
            runs[procs].append(run(procs))
            print(procs, runs[procs][-1], file=sys.stderr, flush=True)
    counts = {c for rs in runs.values() for _, _, c in rs}
    assert len(counts) == 1, f"the runs disagree: {counts}"
    med = {n: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for n, rs in runs.items()}
    one_eval, one_wall = med[1]
    lines = ["# `vmq eval` under torchrun", "",
             f"Machine: {machine_line()}. Command: `python bench/distributed_eval.py {shlex.join(sys.argv[1:])}`. "
             f"{args.note}".rstrip(), "",
             f"vim-fm-tiny on the 10,000 Fashion-MNIST test images, one thread per process (gloo); medians of "
             f"{args.rounds} interleaved runs; every run counted {counts.pop()} correct.", "",
             "| processes | eval s (as printed) | speed-up | whole command s | speed-up |", "|---|---|---|---|---|"]
    for n, (ev, wall) in med.items():
        lines.append(f"| {n} | {ev:.2f} | {one_eval / ev:.2f}x | {wall:.2f} | {one_wall / wall:.2f}x |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
