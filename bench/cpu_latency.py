"""CPU latency: the fused kernels against the pure-torch path, quantized models against FP32, torch and onnxruntime.

    python bench/cpu_latency.py [--threads 1 2] [--reps 7] [--out bench/results/cpu_latency.md] [--quick]
                                [--emulate-avx2] [--malloc reuse|glibc]

The results file keeps one section per CPU class measured (its ISA and model, ``_util.cpu_class``); a run replaces
the tables it ran in its own class's section and keeps the others. ``--emulate-avx2`` caps the vmq_fx kernels, ATen,
oneDNN and MKL at AVX2 (``_util.AVX2_CAPS``), so that an AVX-512 machine measures what an AVX2-only CPU runs (the
onnxruntime rows are not capped: onnxruntime has no such switch).

Each process keeps freed memory for reuse (``--malloc reuse``, the default: ``reuse_freed_memory()``, as ``vmq bench``
does; ``--malloc glibc`` leaves glibc's malloc as it comes, whose heap can shrink and page-fault back in around the
activations of a batch-8 forward, depending on earlier allocations). One process per table (the command starts them
one after the other, never two at once); inside a table every
number is a median of ``--reps`` runs after warm-up, variants interleaved round by round so that a slow minute of this
shared CPU hits all of them, and ratios are taken within the table. Tables:

* ``scan``: ``vmq::selective_scan`` at Vim-T shapes (d_inner 384, L 197, N 16, with D, z, delta bias, softplus),
  forward and forward + backward: the fused C++ kernel, the pure-torch implementation it replaced
  (``native.disabled()``), mamba-ssm's ``selective_scan_ref``; state updates per second; one thread with a second
  busy process on the other core.
* ``linears``: the four Vim-T projections at batch 1 and 8 (M = 197 and 1576 rows): fp32 ``F.linear`` against
  ``vmq::int8_linear`` (W8A8, W4A8) and ``vmq::vq_linear`` (3- and 2-bit; each weight decoded once, the default, and
  2-bit decoded on every call, ``VMQ_FX_VQ_DECODE=per_call``).
* ``models``: vim-fm-tiny (batch 1, 64) and vim_tiny 224x224 (batch 1, 8; random weights): FP32 eager, FP32 on the
  pure-torch scan and convolution (``native.disabled()``: what the project ran before the fused kernels; the column
  says "pure-torch scan"), and the lowered W8A8, W4A8, VQ 3-bit and VQ 2-bit
  models, in torch and in onnxruntime (the standard ``Scan`` export and the ``vmq.SelectiveScan`` custom op).
* ``dynamic``: the lowered per-token dynamic W8A8 model against static W8A8 (SmoothQuant + PTS), in torch and in
  onnxruntime with vmq_fx's ops.
* ``rotation``: the lowered W8A8 model with a Hadamard rotation (``vmq::hadamard_transform``, and the same model with
  the matmuls that op replaced), a KLT rotation and outlier channels, against static W8A8, same runtimes.
* ``norms``: the lowered W8A8 model with its RMSNorms as ``vmq::rms_norm`` / ``vmq::add_rms_norm`` (the lowering's
  default) and as the operators they replace (``vmq_fx.lower(..., fuse_norms=False)``'s graph), against FP32, same
  runtimes.
* ``scan_sums``: the lowered W8A8 model with each Vim block's two scan directions summed in the later scan
  (``vmq::selective_scan(..., add=...)``, the lowering's default) and by an add after it, against FP32, same runtimes.
* ``runtimes``: the same graphs run as Python (a ``torch.fx`` graph module, as the lowered model is) and by vmq_fx's
  C++ graph runner (``vmq_fx.runtime.CppGraphModule``): FP32 (eager, and its ``torch.export`` graph both ways), the
  lowered W8A8 and VQ 2-bit models both ways.
* ``train``: one ``vmq train`` step of vim-fm-tiny (batch 128, forward + backward + AdamW) with the fused kernels and
  the pure-torch scan and convolution.
* ``profile``: where the time of vim_tiny 224x224 goes at batch 8 (FP32, W8A8, VQ 2-bit), by operator, in torch and
  in onnxruntime.

Quantized models for latency only: SmoothQuant + per-token static (no JLSS) and k-means VQ with 3 iterations, on
random calibration images; the kernels and shapes are those of the tuned models.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (AVX2_CAPS, MALLOC_MODES, cpu_class, interleaved, machine_line, mamba_ssm_ref,  # noqa: E402
                   scan_inputs, set_malloc)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import recipes  # noqa: E402
from vmq_fx.ops import native, selective_scan_fn  # noqa: E402

TABLES = ("scan", "linears", "models", "dynamic", "rotation", "norms", "scan_sums", "runtimes", "train", "profile")
# ONNX files per model: standard operators only (the portable Scan), and vmq_fx's onnxruntime ops (vmq.SelectiveScan,
# vmq.Int8Linear: export_onnx(ops=...))
RUNTIMES = {"onnx": "onnxruntime", "vmq": "onnxruntime, vmq ops"}
VIM_T = dict(d_model=192, d_inner=384, length=197, d_state=16, dt_rank=12)


@contextlib.contextmanager
def busy_neighbour():
    """A second process spinning on the CPU for the duration (what a shared machine does to a benchmark)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def ms(t: float) -> str:
    return f"{t * 1e3:.2f}" if t < 0.01 else f"{t * 1e3:.1f}"


# -- scan --------------------------------------------------------------------------------------------------------------
def scan_variants(batch, backward):
    args = scan_inputs(batch, VIM_T["d_inner"], VIM_T["length"], VIM_T["d_state"])
    ref = mamba_ssm_ref()

    def call(fn, disabled=False):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()} if backward else args

        def run():
            with native.disabled() if disabled else contextlib.nullcontext():
                if backward:
                    fn(**leaves, delta_softplus=True).sum().backward()
                else:
                    with torch.no_grad():
                        fn(**leaves, delta_softplus=True)
        return run

    return {"fused": call(selective_scan_fn), "pure torch": call(selective_scan_fn, disabled=True),
            "mamba-ssm ref": call(ref)}


def table_scan(args) -> list[str]:
    d, length, n = VIM_T["d_inner"], VIM_T["length"], VIM_T["d_state"]
    out = ["## Selective scan (Vim-T shapes: d_inner 384, L 197, N 16, one direction of one block)", "",
           "| threads | batch | pass | fused ms | pure-torch ms | mamba-ssm ref ms | fused vs pure torch | "
           "fused M updates/s |", "|---|---|---|---|---|---|---|---|"]
    conditions = [(t, False) for t in args.threads] + [(1, True)]
    for threads, busy in conditions:
        torch.set_num_threads(threads)
        for batch in (1, 8):
            for backward in (False, True):
                with busy_neighbour() if busy else contextlib.nullcontext():
                    t = interleaved(scan_variants(batch, backward), args.reps)
                updates = batch * d * length * n
                label = f"{threads}" + (" + busy neighbour" if busy else "")
                out.append(f"| {label} | {batch} | {'fwd+bwd' if backward else 'fwd'} | {ms(t['fused'])} | "
                           f"{ms(t['pure torch'])} | {ms(t['mamba-ssm ref'])} | "
                           f"{t['pure torch'] / t['fused']:.1f}x | "
                           f"{updates / t['fused'] / 1e6:.0f}" + (" (fwd+bwd)" if backward else "") + " |")
                print(out[-1], file=sys.stderr, flush=True)
    out += ["", "State updates: batch x d_inner x L x N per call (Vim-T b=8: 9.7 M; the whole model's 48 scans: 465 M)."]
    return out


# -- linears -----------------------------------------------------------------------------------------------------------
def _quantized_linear_args(k, n, gen):
    from vmq_fx.ops import pack_codes
    from vmq_fx.ops.int8_linear import prepare_weight
    from vmq_fx.ops.vq_linear import code_bits

    length = VIM_T["length"]
    act = (torch.rand(length, generator=gen) * 0.05 + 0.01, torch.randint(0, 256, (length,), generator=gen,
                                                                          dtype=torch.int32))
    w_scale = torch.rand(n, generator=gen) * 1e-2
    int8 = {}
    for bits in (8, 4):
        qmax = 2 ** (bits - 1) - 1
        w, w_sum = prepare_weight(torch.randint(-qmax, qmax + 1, (n, k), generator=gen))
        int8[bits] = (None, *act, w, w_scale, w_sum, None, 0, 255, bits)
    vq = {}
    for bits, (d, kk) in ((3, (2, 64)), (2, (4, 256))):
        codes = pack_codes(torch.randint(0, kk, (n, -(-k // d)), generator=gen), code_bits(kk))
        vq[bits] = (codes, torch.randn(kk, d, generator=gen).half(), torch.full((n,), 192, dtype=torch.uint8), None, k)
    return int8, vq


@contextlib.contextmanager
def _vq_decoded_per_call():
    kernels = native.native_kernels()
    kernels.set_vq_decode_once(False)
    try:
        yield
    finally:
        kernels.set_vq_decode_once(True)


def table_linears(args) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    dm, di, r, n = VIM_T["d_model"], VIM_T["d_inner"], VIM_T["dt_rank"], VIM_T["d_state"]
    layers = [("in_proj", dm, 2 * di), ("x_proj", di, r + 2 * n), ("dt_proj", r, di), ("out_proj", di, dm)]
    out = ["## Linears alone (Vim-T projections; time per call, ratio = fp32 / quantized)", "",
           "| threads | batch (M rows) | layer (K -> N) | fp32 ms | W8A8 | W4A8 | VQ 3-bit | VQ 2-bit | "
           "VQ 2-bit, decoded per call |",
           "|---|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 8):
            for name, k, nn_ in layers:
                x = torch.randn(batch, VIM_T["length"], k, generator=gen)
                w = torch.randn(nn_, k, generator=gen)
                int8, vq = _quantized_linear_args(k, nn_, gen)
                variants = {"fp32": lambda x=x, w=w: F.linear(x, w)}
                for bits, a in int8.items():
                    variants[f"W{bits}A8"] = lambda x=x, a=a: torch.ops.vmq.int8_linear(x, *a)
                for bits, a in vq.items():
                    variants[f"VQ{bits}"] = lambda x=x, a=a: torch.ops.vmq.vq_linear(x, *a)
                variants["VQ2 per call"] = variants["VQ2"]
                with torch.no_grad():
                    t = interleaved(variants, args.reps, around={"VQ2 per call": _vq_decoded_per_call})
                cells = [f"{ms(t[v])} ({t['fp32'] / t[v]:.2f}x)"
                         for v in ("W8A8", "W4A8", "VQ3", "VQ2", "VQ2 per call")]
                out.append(f"| {threads} | {batch} ({batch * VIM_T['length']}) | {name} ({k} -> {nn_}) | "
                           f"{ms(t['fp32'])} | " + " | ".join(cells) + " |")
                print(out[-1], file=sys.stderr, flush=True)
    return out


# -- models ------------------------------------------------------------------------------------------------------------
def quantized_models(model, example_shape, names=("W8A8", "W4A8", "VQ 3-bit", "VQ 2-bit")):
    """The lowered models of the tables, by name, calibrated on 8 random inputs (seed 0)."""
    calib = torch.randn(8, *example_shape, generator=torch.Generator().manual_seed(0))
    chosen = {"W8A8": lambda: recipes.smoothquant_pts(8, 8), "W4A8": lambda: recipes.smoothquant_pts(4, 8),
              "VQ 3-bit": lambda: recipes.vq_kmeans(3, kmeans_iters=3),
              "VQ 2-bit": lambda: recipes.vq_kmeans(2, kmeans_iters=3)}
    return {name: vmq_fx.quantize(model, chosen[name](), calib, progress=False).lowered for name in names}


def model_specs(quick: bool):
    """(label, build, input shape, batches) of the whole-model tables: vim-fm-tiny, and vim_tiny 224x224 unless quick."""
    specs = [("vim-fm-tiny", lambda: vmq_fx.models.load_reference("vim-fm-tiny"), (1, 28, 28), (1, 64)),
             ("vim_tiny 224x224", lambda: vmq_fx.models.create_model("vim_tiny").eval(), (3, 224, 224), (1, 8))]
    return specs[:1] if quick else specs


def table_models(args) -> list[str]:
    from vmq_fx.export import ort_session

    specs = model_specs(args.quick)
    out = ["## Whole models (median ms per forward; ratio = FP32 eager / variant, same process and threads)", "",
           "| model | runtime | threads | batch | FP32 | FP32, pure-torch scan | W8A8 | W4A8 | VQ 3-bit | VQ 2-bit |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    for label, build, shape, batches in specs:
        torch.manual_seed(0)
        model = build()
        models = {"FP32": model, **quantized_models(model, shape)}
        onnx_paths = {ops: {name: vmq_fx.export_onnx(m, torch.randn(2, *shape), tmp / f"{name}_{ops}.onnx".replace(
            " ", ""), ops=ops).path for name, m in models.items()} for ops in RUNTIMES}
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {ops: {name: ort_session(path, threads=threads) for name, path in paths.items()}
                        for ops, paths in onnx_paths.items()}
            for batch in batches:
                x = torch.randn(batch, *shape)
                feed = {sessions["onnx"]["FP32"].get_inputs()[0].name: x.numpy()}

                def eager(m):
                    return lambda: m(x)

                def pure_torch():
                    with native.disabled():
                        model(x)

                with torch.no_grad():
                    t = interleaved({"FP32": eager(model), "FP32 pure": pure_torch,
                                     **{k: eager(m) for k, m in models.items() if k != "FP32"}}, args.reps)
                o = {ops: interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in by_name.items()}, args.reps)
                     for ops, by_name in sessions.items()}

                def cells(times, base, keys):
                    return " | ".join(f"{ms(times[k])} ({base / times[k]:.2f}x)" for k in keys)

                quant = ["W8A8", "W4A8", "VQ 3-bit", "VQ 2-bit"]
                out.append(f"| {label} | torch | {threads} | {batch} | {ms(t['FP32'])} | "
                           f"{ms(t['FP32 pure'])} ({t['FP32'] / t['FP32 pure']:.2f}x) | "
                           + cells(t, t["FP32"], quant) + " |")
                for ops, runtime in RUNTIMES.items():
                    out.append(f"| {label} | {runtime} | {threads} | {batch} | {ms(o[ops]['FP32'])} | - | "
                               + cells(o[ops], o[ops]["FP32"], quant) + " |")
                print("\n".join(out[-1 - len(RUNTIMES):]), file=sys.stderr, flush=True)
    return out


# -- dynamic -----------------------------------------------------------------------------------------------------------
def timed_lowered(args, variants: dict, derived: dict | None = None):
    """Yield ``(label, runtime, threads, batch, {name: median s})`` for FP32 and each recipe's lowered model (built
    on 8 random images), in torch and in onnxruntime with vmq_fx's ops, interleaved in one process. ``derived``:
    ``{name: (variant, fn)}``, more models made by ``fn`` from a copy of a variant's lowered model."""
    from vmq_fx.export import ort_session

    tmp = Path(tempfile.mkdtemp())
    for label, build, shape, batches in model_specs(args.quick):
        torch.manual_seed(0)
        model = build()
        calib = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
        models = {"FP32": model, **{name: vmq_fx.quantize(model, r, calib, progress=False).lowered
                                    for name, r in variants.items()}}
        models.update({name: fn(copy.deepcopy(models[base])) for name, (base, fn) in (derived or {}).items()})
        paths = {name: vmq_fx.export_onnx(m, torch.randn(2, *shape), tmp / f"{name}.onnx", ops="vmq").path
                 for name, m in models.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {name: ort_session(path, threads=threads) for name, path in paths.items()}
            for batch in batches:
                x = torch.randn(batch, *shape)
                feed = {sessions["FP32"].get_inputs()[0].name: x.numpy()}
                with torch.no_grad():
                    t = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.reps)
                o = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, args.reps)
                yield label, "torch", threads, batch, t
                yield label, RUNTIMES["vmq"], threads, batch, o


def table_dynamic(args) -> list[str]:
    """Per-token dynamic W8A8 (each row's parameters computed in the op) against static W8A8, in torch and in
    onnxruntime with vmq_fx's ops (the standard Scan would hide the linears)."""
    out = ["## Per-token dynamic W8A8 (median ms per forward; ratios against static W8A8 and FP32, same process)", "",
           "| model | runtime | threads | batch | FP32 | W8A8 static | W8A8 per-token dynamic | dynamic / static speed |",
           "|---|---|---|---|---|---|---|---|"]
    variants = {"static": recipes.smoothquant_pts(8, 8), "dynamic": recipes.per_token_dynamic(8, 8)}
    return out + _two_variant_rows(args, variants, {}, ("static", "dynamic"), faster="dynamic")


def _two_variant_rows(args, variants: dict, derived: dict, shown: tuple[str, str], faster: str) -> list[str]:
    """Table rows ``model | runtime | threads | batch | FP32 | shown[0] | shown[1] | speed`` from
    :func:`timed_lowered`: each variant's ms and its ratio to FP32, then how much faster ``faster`` runs than the other
    one."""
    rows = []
    slower = shown[1] if faster == shown[0] else shown[0]
    for label, runtime, threads, batch, times in timed_lowered(args, variants, derived):
        rows.append(f"| {label} | {runtime} | {threads} | {batch} | {ms(times['FP32'])} | "
                    + " | ".join(f"{ms(times[k])} ({times['FP32'] / times[k]:.2f}x FP32)" for k in shown)
                    + f" | {times[slower] / times[faster]:.2f}x |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


# -- rotation ----------------------------------------------------------------------------------------------------------
def _hadamard_matmuls(x, odd, h):
    """The Hadamard rotation as matmuls (what the graph held before ``vmq::hadamard_transform``): ``x`` viewed as
    ``[m, 2^k]`` times ``H_{2^k}``, then ``odd^T`` from the left."""
    m = 1 if odd is None else odd.shape[0]
    y = x.unflatten(-1, (m, h.shape[0])) @ h
    return (y if odd is None else odd.T @ y).flatten(-2)


def as_hadamard_matmuls(lowered):
    """Each ``vmq.hadamard_transform`` node of a lowered model as :func:`_hadamard_matmuls`, with ``H`` a buffer per
    size, as the graph held it."""
    from vmq_fx.ops.hadamard import walsh_hadamard

    graph = lowered.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.vmq.hadamard_transform.default:
            x, odd = node.args
            m = 1 if odd is None else lowered.get_buffer(str(odd.target)).shape[0]
            b = node.meta["val"].shape[-1] // m
            if not hasattr(lowered, f"bench_hadamard_{b}"):
                lowered.register_buffer(f"bench_hadamard_{b}", walsh_hadamard(b).float())
            with graph.inserting_before(node):
                h = graph.get_attr(f"bench_hadamard_{b}")
            node.target, node.args = _hadamard_matmuls, (x, odd, h)
    lowered.recompile()
    return lowered


def table_rotation(args) -> list[str]:
    """What a rotation (Hadamard by the fast transform op, and as the matmuls it replaced; KLT dense) or outlier
    channels cost in the lowered W8A8 model, against plain static W8A8 (SmoothQuant + PTS), in torch and in
    onnxruntime with vmq_fx's ops."""
    variants = {"static": recipes.smoothquant_pts(8, 8), "Hadamard": recipes.smoothquant_pts(8, 8, rotation="hadamard"),
                "KLT": recipes.smoothquant_pts(8, 8, rotation="klt"),
                "outliers": recipes.smoothquant_pts(8, 8, outlier_fraction=1 / 32)}
    derived = {"Hadamard as matmuls": ("Hadamard", as_hadamard_matmuls)}
    shown = [*list(variants)[1:], *derived]
    out = ["## Rotations and outlier channels, W8A8 (median ms per forward; ratios against static W8A8, same process)",
           "", "| model | runtime | threads | batch | FP32 | W8A8 static | " + " | ".join(shown) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(shown)]
    for label, runtime, threads, batch, times in timed_lowered(args, variants, derived):
        out.append(f"| {label} | {runtime} | {threads} | {batch} | {ms(times['FP32'])} | "
                   f"{ms(times['static'])} ({times['FP32'] / times['static']:.2f}x FP32) | "
                   + " | ".join(f"{ms(times[k])} ({times['static'] / times[k]:.2f}x)" for k in shown) + " |")
        print(out[-1], file=sys.stderr, flush=True)
    return out


# -- norms -------------------------------------------------------------------------------------------------------------
def _add_then_norm(x, residual, weight, eps):
    from vmq_fx.ops.rms_norm import rms_norm_reference

    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def as_unfused_norms(lowered):
    """Each ``vmq.rms_norm`` / ``vmq.add_rms_norm`` node of a lowered model as the operators it replaced (the add, then
    ``rms_norm_reference``'s six)."""
    from vmq_fx.ops.rms_norm import rms_norm_reference

    unfused = {torch.ops.vmq.rms_norm.default: rms_norm_reference, torch.ops.vmq.add_rms_norm.default: _add_then_norm}
    for node in lowered.graph.nodes:
        node.target = unfused.get(node.target, node.target)
    lowered.recompile()
    return lowered


def table_norms(args) -> list[str]:
    """What the lowering's one-pass RMSNorm (``vmq::rms_norm`` / ``vmq::add_rms_norm``) gains over the operators it
    replaces (the residual add and the norm's six), in the lowered W8A8 model, in torch and in onnxruntime with vmq_fx's
    ops (``vmq.RmsNorm`` / ``vmq.AddRmsNorm``)."""
    variants = {"W8A8": recipes.smoothquant_pts(8, 8)}
    derived = {"unfused": ("W8A8", as_unfused_norms)}
    out = ["## RMSNorm as one op, W8A8 (median ms per forward; ratios against FP32 and fused / unfused, same process)",
           "", "| model | runtime | threads | batch | FP32 | W8A8, norms fused (the default) | W8A8, residual adds and "
           "norms as separate operators | fused / unfused speed |", "|---|---|---|---|---|---|---|---|"]
    return out + _two_variant_rows(args, variants, derived, ("W8A8", "unfused"), faster="W8A8")


# -- scan sums ---------------------------------------------------------------------------------------------------------
def as_unfused_scan_sums(lowered):
    """Each ``vmq.selective_scan`` node that adds another scan's output (its ``add``) as the scan alone and the add
    after it that it replaced."""
    graph = lowered.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.vmq.selective_scan.default and len(node.args) > 10 and node.args[10] is not None:
            other, node.args = node.args[10], node.args[:10]
            out = next(u for u in node.users if u.args[1] == 0)
            with graph.inserting_after(out):
                total = graph.call_function(torch.ops.aten.add.Tensor, (other, out))
            total.meta = dict(out.meta)
            out.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    lowered.recompile()
    return lowered


def table_scan_sums(args) -> list[str]:
    """What summing Vim's two scan directions in the later scan's output pass gains over the add after it, in the
    lowered W8A8 model, in torch and in onnxruntime with vmq_fx's ops."""
    variants = {"W8A8": recipes.smoothquant_pts(8, 8)}
    derived = {"unfused": ("W8A8", as_unfused_scan_sums)}
    out = ["## The two scan directions summed in the scan, W8A8 (median ms per forward; ratios against FP32 and fused / "
           "unfused, same process)", "", "| model | runtime | threads | batch | FP32 | W8A8, sums in the scan (the "
           "default) | W8A8, sums by an add | fused / unfused speed |", "|---|---|---|---|---|---|---|---|"]
    return out + _two_variant_rows(args, variants, derived, ("W8A8", "unfused"), faster="W8A8")


# -- runtimes ----------------------------------------------------------------------------------------------------------
def table_runtimes(args) -> list[str]:
    """FP32 and lowered models with their graphs run as Python and by the C++ graph runner, interleaved in one
    process: each runtime's quantized models against its own FP32, and the runner against Python."""
    from vmq_fx.runtime import CppGraphModule

    out = ["## The graph run as Python or by the C++ graph runner (median ms per forward; W8A8 and VQ 2-bit against "
           "FP32 in the same runtime; runner / Python speed in brackets; same process)", "",
           "| model | threads | batch | FP32 eager | FP32 exported, Python | FP32 exported, runner | W8A8, Python | "
           "W8A8, runner | VQ 2-bit, Python | VQ 2-bit, runner |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, build, shape, batches in model_specs(args.quick):
        torch.manual_seed(0)
        model = build()
        graphs = {"FP32": vmq_fx.export_model(model, torch.randn(2, *shape)).module(),
                  **quantized_models(model, shape, names=("W8A8", "VQ 2-bit"))}
        variants = {"eager": model, **{f"{k} python": g for k, g in graphs.items()},
                    **{f"{k} runner": CppGraphModule(g) for k, g in graphs.items()}}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in batches:
                x = torch.randn(batch, *shape)
                with torch.no_grad():
                    t = interleaved({k: (lambda m=m: m(x)) for k, m in variants.items()}, args.reps)
                cells = [ms(t["eager"])]
                for k in graphs:
                    py, run = t[f"{k} python"], t[f"{k} runner"]
                    if k == "FP32":
                        cells += [f"{ms(py)} ({t['eager'] / py:.2f}x eager)", f"{ms(run)} ({py / run:.2f}x)"]
                    else:
                        fp_py, fp_run = t["FP32 python"], t["FP32 runner"]
                        cells += [f"{ms(py)} ({fp_py / py:.2f}x)", f"{ms(run)} ({fp_run / run:.2f}x; {py / run:.2f}x)"]
                out.append(f"| {label} | {threads} | {batch} | " + " | ".join(cells) + " |")
                print(out[-1], file=sys.stderr, flush=True)
    return out


# -- train -------------------------------------------------------------------------------------------------------------
def table_train(args) -> list[str]:
    out = ["## One training step of vim-fm-tiny (batch 128: forward, backward, AdamW)", "",
           "| threads | fused scan ms | pure-torch scan ms | speed-up |", "|---|---|---|---|"]
    model = vmq_fx.models.create_model("vim_fm_tiny", drop_path_rate=0.05).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(disabled):
        def run():
            with native.disabled() if disabled else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run

    for threads in args.threads:
        torch.set_num_threads(threads)
        t = interleaved({"fused": step(False), "pure": step(True)}, max(3, args.reps // 2))
        out.append(f"| {threads} | {ms(t['fused'])} | {ms(t['pure'])} | {t['pure'] / t['fused']:.2f}x |")
        print(out[-1], file=sys.stderr, flush=True)
    return out


# -- profile -----------------------------------------------------------------------------------------------------------
def _torch_profile(label, model, x) -> list[str]:
    with torch.no_grad():
        model(x)
        with torch.profiler.profile() as prof:
            model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    out = [f"{label}: {total / 1e3:.0f} ms in all", "", "| operator | calls | self ms | share |", "|---|---|---|---|"]
    out += [f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {100 * e.self_cpu_time_total / total:.0f} % |"
            for e in events[:10]]
    return out + [""]


def _ort_profile(label, path, x, threads, tmp) -> list[str]:
    """Kernel time of one onnxruntime run by operator type (its own profiler). A ``Scan`` node's time includes its
    body's nodes, which are listed on their own rows as well ("in the Scan body": they run inside a ``Scan``)."""
    import json
    from collections import defaultdict

    from vmq_fx.export import ort_session

    sess = ort_session(path, threads=threads, profile_prefix=str(tmp / label.replace(" ", "_")))
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(2):  # a warm-up run, then the one counted
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    run = [e for e in events if e.get("name") == "model_run"][-1]
    nodes = [e for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= run["ts"]]
    scans = [(e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"]["op_name"] == "Scan"]
    ms, calls = defaultdict(float), defaultdict(int)
    for e in nodes:
        op = e["args"]["op_name"]
        if op != "Scan" and any(lo <= e["ts"] <= hi for lo, hi in scans):
            op += " (in the Scan body)"
        ms[op] += e["dur"] / 1e3
        calls[op] += 1
    total = run["dur"] / 1e3
    out = [f"{label}: {total:.0f} ms for the run", "", "| operator type | kernel calls | ms | share of the run |",
           "|---|---|---|---|"]
    out += [f"| {op} | {calls[op]} | {t:.1f} | {100 * t / total:.0f} % |"
            for op, t in sorted(ms.items(), key=lambda kv: kv[1], reverse=True)[:10]]
    return out + [""]


def table_profile(args) -> list[str]:
    threads = args.threads[0]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vmq_fx.models.create_model("vim_tiny").eval()
    quantized = {} if args.quick else quantized_models(model, (3, 224, 224))
    x = torch.randn(8, 3, 224, 224)
    out = [f"## Where the time goes: vim_tiny 224x224, batch 8, {threads} thread(s)", "",
           "torch profiler, self time by operator:", ""]
    torch_models = {"FP32": model, **{f"{k} lowered": quantized[k] for k in ("W8A8", "VQ 2-bit") if k in quantized}}
    for label, m in torch_models.items():
        out += _torch_profile(label, m, x)
    out += ["onnxruntime's profiler, kernel time by operator type (the exported files of the same models; the FP32 "
            "model with standard operators, then every model with vmq_fx's onnxruntime ops):", ""]
    tmp = Path(tempfile.mkdtemp())
    runs = [("FP32", "onnx")] + [(label, "vmq") for label in torch_models]
    for label, ops in runs:
        path = vmq_fx.export_onnx(torch_models[label], torch.randn(2, 3, 224, 224),
                                  tmp / f"{label}_{ops}.onnx".replace(" ", ""), ops=ops).path
        out += _ort_profile(f"{label} ({RUNTIMES[ops]})", path, x, threads, tmp)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5, help="timed runs per variant and round (3 rounds)")
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    p.add_argument("--quick", action="store_true", help="vim-fm-tiny only (a smoke run)")
    p.add_argument("--emulate-avx2", action="store_true", help="cap every library at AVX2 (see the docstring)")
    p.add_argument("--note", default="", help="what else ran on the machine, for the header")
    p.add_argument("--malloc", choices=MALLOC_MODES, default="reuse",
                   help="reuse: freed memory served again (reuse_freed_memory, as `vmq bench`); glibc: as it comes")
    p.add_argument("--out", default="bench/results/cpu_latency.md")
    p.add_argument("--table", help=argparse.SUPPRESS)  # internal: run one table in this process
    args = p.parse_args()
    set_malloc(args.malloc)
    if args.table:
        print("\n".join(globals()[f"table_{args.table}"](args)))
        return
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):
        # set before torch, MKL, oneDNN and vmq_fx load (they read them once): this process and its table processes
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_CAPS}))
    sections = {}
    for name in args.tables:  # one fresh process per table, one after the other
        cmd = [sys.executable, __file__, "--table", name, "--threads", *map(str, args.threads), "--reps",
               str(args.reps), "--malloc", args.malloc] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress goes to stderr, as it comes
        if res.returncode:
            sys.exit(f"table {name} failed (exit {res.returncode})")
        start = res.stdout.index("## ")  # after whatever libraries printed on import
        sections[name] = ["#" + line if line.startswith("## ") else line for line in res.stdout[start:].splitlines()]
        sections[name] += ["", f"({name}: {time.perf_counter() - t0:.0f} s)", ""]
    run_line = (f"Machine: {machine_line()}. Command: `python bench/cpu_latency.py {shlex.join(sys.argv[1:])}`. "
                f"{args.note}").rstrip()
    label = cpu_class()
    out = Path(args.out)
    header, classes = _read_classes(out.read_text()) if out.exists() else (list(_HEADER), {})
    kept_header, kept = classes.get(label, ([], {}))
    if set(args.tables) != set(TABLES) and kept:  # a partial run replaces its tables in its class's section
        while kept_header and not kept_header[-1]:
            kept_header.pop()
        class_header = kept_header + ["", f"Tables {', '.join(sections)} re-run: {run_line}", ""]
        sections = {name: sections.get(name, kept.get(name)) for name in TABLES if name in sections or name in kept}
    else:
        class_header = [f"## {label}", "", run_line, ""]
    classes[label] = (class_header, sections)
    lines = list(header)
    for class_header, tables in classes.values():
        lines += class_header + [line for table in tables.values() for line in table]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text)


_HEADER = ["# CPU latency", "", "One section per CPU class measured (its ISA and model); in each, one process per table, "
           "run one after the other; medians of 3 interleaved rounds of the runs per variant; ratios within a table.",
           ""]


def _read_classes(text: str) -> tuple[list[str], dict[str, tuple[list[str], dict[str, list[str]]]]]:
    """A results file split into its header and, per CPU class (``## `` headings), that section's header and its
    tables (``### `` headings; each ends with its ``(name: N s)`` line)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    classes = {}
    for i, start in enumerate(starts):
        block = lines[start:starts[i + 1] if i + 1 < len(starts) else len(lines)]
        first = next((j for j, line in enumerate(block) if line.startswith("### ")), len(block))
        tables, current = {}, []
        for line in block[first:]:
            current.append(line)
            match = re.fullmatch(r"\((\w+): \d+ s\)", line)
            if match:
                tables[match.group(1)] = current + [""]
                current = []
            elif not line and not current[:-1]:
                current = []
        classes[block[0][3:]] = (block[:first], tables)
    return lines[:starts[0]] if starts else list(_HEADER), classes


if __name__ == "__main__":
    main()
