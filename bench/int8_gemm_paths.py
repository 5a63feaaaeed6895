"""The lowered W8A8 models on each integer-product path of ``vmq::int8_linear`` this CPU runs exactly, against FP32, in
one process: what ``vmq_fx.ops.native.int8_gemm_path``'s choice and the kernel's direct product are worth end to end.

    python bench/int8_gemm_paths.py [--rounds 7] [--malloc reuse|glibc] [--note '...']
                                    [--out bench/results/int8_gemm_paths.md]

vim_tiny 224x224 with random weights (batch 1 and 8) and the shipped vim-fm-tiny (17 tokens; batch 1 and 64), SmoothQuant
+ PTS W8A8 calibrated on 8 images, one thread. The paths: ``int_mm`` (``torch._int_mm``), ``vnni`` (vmq_fx's own
uint8 x int8 product, what CPUs with AVX-512 VNNI and no AMX take; AVX-512 builds), ``amx`` (the same product on AMX
tiles, what CPUs with AMX-INT8 take; AVX-512 builds), ``int16`` (vmq_fx's own int16 product, what x86 CPUs without
int8 dot products take; x86 builds) and ``float`` (the fp32 GEMM on the dequantized levels, ARM64's); ``int_mm`` only
where the CPU has int8 dot products (VNNI / AMX; without them ``_int_mm`` is many times slower, or wrong under a
capped oneDNN). The library paths run with the kernel's direct product for small products, few rows and tiny K (the
default) and without it ("library only": every product through the path's GEMM, as before the direct product). Each
variant is switched to before its block of runs, outside the timing; variants are interleaved over ``--rounds`` rounds
and the medians reported. A second table does the same in onnxruntime with vmq_fx's custom ops (``ops="vmq"``, one
intra-op thread): the W8A8 file's ``vmq.Int8Linear`` with its direct product and without it (a session created under
``VMQ_FX_ORT_DIRECT=0``: every product through onnxruntime's ``MatMulInteger``), against the FP32 file. The results
file keeps one section per CPU class; a run replaces its own class's. The process keeps freed memory for reuse
(``--malloc reuse``, the default, as ``bench/cpu_latency.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import MALLOC_MODES, cpu_class, interleaved, machine_line, set_malloc, write_class_section  # noqa: E402


def main():
    import vmq_fx
    from vmq_fx import recipes
    from vmq_fx.ops import native

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--note", default="")
    p.add_argument("--malloc", choices=MALLOC_MODES, default="reuse",
                   help="reuse: freed memory served again (reuse_freed_memory, as `vmq bench`); glibc: as it comes")
    p.add_argument("--out", default="bench/results/int8_gemm_paths.md")
    args = p.parse_args()
    set_malloc(args.malloc)
    kernels = native.kernels()
    if kernels is None:
        sys.exit("int8_gemm_paths: the vmq_fx CPU kernels are not available here (see the log above)")
    torch.set_num_threads(1)
    dot = native.INT8_DOT_FLAGS & native._cpu_flags()
    runs_here = {"int_mm": bool(dot)}
    paths = [g for g in native.INT8_GEMM_PATHS if runs_here.get(g, True) and native.int8_gemm_runs(g, kernels.isa)]
    chosen = native.int8_gemm_path()[0]
    torch.manual_seed(0)
    vim_tiny = vmq_fx.models.create_model("vim_tiny").eval()
    fm_tiny = vmq_fx.models.load_reference("vim-fm-tiny").eval()
    models = {"vim_tiny 224x224": (vim_tiny, (3, 224, 224), ((1, 5), (8, 2))),
              "vim-fm-tiny": (fm_tiny, (1, 28, 28), ((1, 200), (64, 10)))}

    @contextlib.contextmanager
    def on(path, direct):
        with native.use_isa(kernels.isa, int8_gemm=path) as active:
            active.set_int8_direct(direct)
            try:
                yield
            finally:
                active.set_int8_direct(True)

    # vnni and amx multiply every product themselves, with or without the direct product: no "library only" variant
    variants = [(g, d) for g in paths for d in ((True,) if g in ("vnni", "amx") else (True, False))]
    names = {v: f"{v[0]}" if v[1] else f"{v[0]}, library only" for v in variants}
    lines = [f"## {cpu_class()}", "",
             f"Machine: {machine_line()}. Command: `python bench/int8_gemm_paths.py {shlex.join(sys.argv[1:])}`. "
             f"{args.note}".rstrip(), "",
             f"Lowered W8A8 (SmoothQuant + PTS), one thread, medians of {args.rounds} interleaved rounds; ratio = FP32 / "
             f"variant. `int8_gemm_path` chooses `{chosen}` here; \"library only\": without the kernel's direct product.",
             "", "| model | batch | FP32 ms | " + " | ".join(f"W8A8, {names[v]}" for v in variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    ort_rows = []
    for label, (model, shape, batches) in models.items():
        calib = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
        lowered = vmq_fx.quantize(model, recipes.smoothquant_pts(8, 8), calib, progress=False).lowered
        ort_rows += ort_direct_rows(label, model, lowered, shape, batches, args.rounds)
        for batch, reps in batches:
            x = torch.randn(batch, *shape)
            runs = {"FP32": lambda: model(x), **{names[v]: (lambda: lowered(x)) for v in variants}}
            with torch.no_grad():
                t = interleaved(runs, reps, rounds=args.rounds, around={names[v]: (lambda v=v: on(*v)) for v in variants})
            lines.append(f"| {label} | {batch} | {t['FP32'] * 1e3:.2f} | "
                         + " | ".join(f"{t[names[v]] * 1e3:.2f} ({t['FP32'] / t[names[v]]:.2f}x)" for v in variants)
                         + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    if ort_rows:
        lines += ["", "onnxruntime with vmq_fx's custom ops, one intra-op thread, the same models and rounds; ratio = FP32 "
                  "file / variant. `MatMulInteger only`: the session made under `VMQ_FX_ORT_DIRECT=0`.", "",
                  "| model | batch | FP32 ms | W8A8 (`vmq.Int8Linear`) | W8A8, `MatMulInteger` only |",
                  "|---|---|---|---|---|", *ort_rows]
    write_class_section(args.out, "# vmq::int8_linear's product paths, end to end\n\nOne section per CPU class "
                        "measured; a re-run replaces its own class's section.", lines + [""])
    print("\n".join(lines))


def ort_direct_rows(label, model, lowered, shape, batches, rounds) -> list[str]:
    """Table rows of the onnxruntime A/B (none, with one line on stderr, without the custom-op library)."""
    import os
    import tempfile

    import vmq_fx
    from vmq_fx.export import ort_session
    from vmq_fx.export.ort_ops import headers_dir

    if headers_dir() is None:
        print("int8_gemm_paths: no onnxruntime headers (python -m vmq_fx.export.ort_ops --fetch-headers): "
              "the onnxruntime table is left out", file=sys.stderr)
        return []
    tmp = Path(tempfile.mkdtemp())
    paths = {name: vmq_fx.export_onnx(m, torch.randn(2, *shape), tmp / f"{name}.onnx", ops="vmq").path
             for name, m in (("fp32", model), ("w8a8", lowered))}
    sessions = {"FP32": ort_session(paths["fp32"], threads=1), "direct": ort_session(paths["w8a8"], threads=1)}
    before = os.environ.get("VMQ_FX_ORT_DIRECT")
    os.environ["VMQ_FX_ORT_DIRECT"] = "0"  # read when the session creates its kernels
    try:
        sessions["MatMulInteger only"] = ort_session(paths["w8a8"], threads=1)
    finally:
        if before is None:
            del os.environ["VMQ_FX_ORT_DIRECT"]
        else:
            os.environ["VMQ_FX_ORT_DIRECT"] = before
    rows = []
    for batch, reps in batches:
        feed = {sessions["FP32"].get_inputs()[0].name: torch.randn(batch, *shape).numpy()}
        t = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, reps, rounds=rounds)
        rows.append(f"| {label} | {batch} | {t['FP32'] * 1e3:.2f} | "
                    + " | ".join(f"{t[k] * 1e3:.2f} ({t['FP32'] / t[k]:.2f}x)" for k in ("direct", "MatMulInteger only"))
                    + " |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
