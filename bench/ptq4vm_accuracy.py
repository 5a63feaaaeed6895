"""PTQ4VM accuracy with seeds on the shipped reference models (full Fashion-MNIST test set, CPU).

    python bench/ptq4vm_accuracy.py [--models vim-fm-tiny ...] [--bits w4a4 w4a8 ...] [--seeds 0 1 2]
        [--methods per-tensor per-token-dynamic sq-pts ptq4vm ...] [--threads N] [--cache F.jsonl] [--out F.md]

A method is a recipe name without its bit widths (``ptq4vm``, ``sq-pts``, ``ptq4vm[lr_act=5e-5]`` ...; see
``vmq_fx.pt2e.recipes.from_name``), so the same script gives the main table and the JLSS ablation (``--methods sq-pts
"ptq4vm[jlss_target=mixer]" ptq4vm ... --out bench/results/jlss_ablation.md``). A calibration seed picks the 256
calibration images from the training split and seeds the optimization's sampling. Every run is evaluated on the
convert_pt2e graph (Q/DQ; the lowered integer model agrees with it, tests/test_ptq4vm_flow.py) and appended to the
cache (``.jsonl``), so that an interrupted or extended run measures only what is missing (``--lowered``: also the runs
recorded before the lowered model's top-1 was measured; ``--remeasure``: every run asked for, after a change to
their code path); the table is rendered from
the cache after every run: top-1 as mean ± std over seeds, and paired differences (same seeds) against the
baselines, with the verdict of ``_util.compare``. Agreement with FP (top-1 of the same image) and KL(FP || Q) of the
logits are finer-grained than accuracy and are reported too.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ResultCache, compare, fmt_spread, machine_line, mean_std, test_set, top1  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e  # noqa: E402
from vmq_fx.app.data import calibration_images  # noqa: E402
from vmq_fx.app.evaluate import predict  # noqa: E402
from vmq_fx.models import load_reference  # noqa: E402
from vmq_fx.pt2e.diagnostics import bits_per_activation, bits_per_weight  # noqa: E402
from vmq_fx.pt2e.flow import method_from_name  # noqa: E402

# ptq4vm: vmq_fx's default (JLSS on the residual stream); ptq4vm[target=mixer]: the authors' settings (results files
# written before the JLSSConfig split name it ptq4vm[jlss_target=mixer])
DEFAULT_METHODS = ["per-tensor", "per-token-dynamic", "sq-pts", "ptq4vm[target=mixer]", "ptq4vm"]
BASELINES = ["per-token-dynamic", "sq-pts"]  # paired differences of every other method against these


def recipe_for(method: str, bits: str, seed: int):
    """(recipe, JLSS config seeded with ``seed``, or None without JLSS) of a method at ``bits``."""
    base, _, extra = method.partition("[")
    recipe, config = method_from_name(f"{base}-{bits}" + (f"[{extra}" if extra else ""))
    if recipe.jlss:
        config = dataclasses.replace(config or vmq_fx.JLSSConfig(), seed=seed)
    return recipe, config


def measure(name: str, method: str, bits: str, seed: int, calib_n: int, x_test, labels, fp_logits) -> dict:
    model = load_reference(name)
    recipe, config = recipe_for(method, bits, seed)
    calib = calibration_images(calib_n, seed=seed)
    t0 = time.perf_counter()
    # The convert_pt2e graph (Q/DQ) is what every method shares.
    prepared = prepare_pt2e(vmq_fx.export_model(model, calib[:2]).module(), VisualMambaQuantizer(recipe))
    vmq_fx.calibrate(prepared, calib, progress=False)
    report = vmq_fx.jlss(prepared, calib, config, progress=False) if recipe.jlss else None
    quantized = convert_pt2e(prepared)
    secs = time.perf_counter() - t0
    logits = predict(quantized, x_test)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), fp_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    lowered = vmq_fx.lower(quantized)
    lowered_top1 = top1(predict(lowered, x_test), labels)
    return {"model": name, "method": method, "bits": bits, "seed": seed, "calib": calib_n, "test": len(labels),
            "recipe": recipe.name, "top1": top1(logits, labels),
            "agree": 100.0 * (logits.argmax(-1) == fp_logits.argmax(-1)).float().mean().item(), "kl": kl,
            "seconds": secs, "top1_lowered": lowered_top1, "bits_w": bits_per_weight(lowered), "bits_a": bits_per_activation(lowered),
            "block_loss": None if report is None else [sum(report.loss_before) / report.blocks,
                                                       sum(report.loss_after) / report.blocks]}


def render(cache: ResultCache, args, fps: dict) -> str:
    lines = [
        f"# {args.title}", "",
        f"Machine: {machine_line()}. Command: `python bench/ptq4vm_accuracy.py {shlex.join(sys.argv[1:])}`.", "",
        f"Top-1 (%) of the convert_pt2e (Q/DQ) graph on the {args.limit or 10000} Fashion-MNIST test images, "
        f"mean ± std over calibration seeds (seed s: {args.calib} training images drawn with seed s, JLSS "
        "mini-batches seeded with s); `n`: seeds. Paired differences (same seeds) against the baselines: mean ± "
        "std of the per-seed differences; a difference counts when a two-sided paired t-test at 95 % says so (with "
        "3 seeds: mean above 2.5 times that std), \"within noise\" otherwise. Agreement: same top-1 as FP32; KL: "
        "KL(FP32 || quantized) of the logits, batch mean. Lowered: top-1 of the lowered model (vmq::int8_linear), mean "
        "over the same seeds. Bits W / A: all in, as the lowered model holds and "
        "computes them (weights with their row scales and column sums; activations per input channel, outlier "
        "channels counted twice: once in the main op, once at 8 bits; rows measured before this column: -). JLSS loss: the mean block loss (1 - cos) before -> after. "
        f"Time: quantization on this CPU. {args.note}", "",
    ]
    for name in args.models:
        if name not in fps:
            continue
        lines += [f"## {name} (FP32 {fps[name]:.2f} %)", "",
                  "| bits | method | n | top-1 % | vs FP32 | vs " + " | vs ".join(BASELINES) +
                  " | agreement % | KL | lowered % | bits W / A | JLSS loss | time s |",
                  "|---|---|---|---|---|" + "---|" * len(BASELINES) + "---|---|---|---|---|---|"]
        for bits in args.bits:
            by_method = cache.by_method(args.methods, args.seeds, model=name, bits=bits, test=args.limit or 10000)
            for method, recs in by_method.items():
                acc = {s: r["top1"] for s, r in recs.items()}
                cmp = [compare(acc, {s: r["top1"] for s, r in by_method[b].items()})
                       if b in by_method and b != method else "-" for b in BASELINES]
                losses = [r["block_loss"] for r in recs.values() if r["block_loss"]]
                loss = (f"{mean_std(v[0] for v in losses)[0]:.4f} -> {mean_std(v[1] for v in losses)[0]:.4f}"
                        if losses else "-")
                sized = [r for r in recs.values() if "bits_w" in r]
                low = (f"{mean_std(r['top1_lowered'] for r in sized)[0]:.2f}" if len(sized) == len(recs) else "-")
                sizes = (f"{mean_std(r['bits_w'] for r in sized)[0]:.2f} / {mean_std(r['bits_a'] for r in sized)[0]:.2f}"
                         if sized else "-")
                lines.append(
                    f"| {bits.upper()} | {method} | {len(acc)} | {fmt_spread(acc.values())} "
                    f"| {mean_std(acc.values())[0] - fps[name]:+.2f} | " + " | ".join(cmp) +
                    f" | {fmt_spread(r['agree'] for r in recs.values())} "
                    f"| {mean_std(r['kl'] for r in recs.values())[0]:.4f} | {low} | {sizes} | {loss} "
                    f"| {mean_std(r['seconds'] for r in recs.values())[0]:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-tiny", "vmamba-fm-tiny", "vim-fm-197"])
    p.add_argument("--bits", nargs="+", default=["w8a8", "w6a6", "w4a8", "w4a4"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--title", default="PTQ4VM accuracy with calibration seeds")
    p.add_argument("--note", default="", help="what else ran on the machine (for the header)")
    p.add_argument("--lowered", action="store_true",
                   help="measure again the cached runs that lack the lowered model's top-1 (recorded before the "
                        "benchmark measured it)")
    p.add_argument("--remeasure", action="store_true",
                   help="measure every run asked for again, replacing the cached records (after a change to the code "
                        "those runs go through)")
    p.add_argument("--render-only", action="store_true", help="rewrite the table from the cache, measure nothing")
    p.add_argument("--cache", default="bench/results/ptq4vm_accuracy.jsonl")
    p.add_argument("--out", default="bench/results/ptq4vm_accuracy.md")
    args = p.parse_args()
    for bits in args.bits:
        if not re.fullmatch(r"w\d+a\d+", bits):
            p.error(f"--bits {bits!r}: expected w<W>a<A>, e.g. w4a4")
    for method in [] if args.render_only else args.methods:  # fail on a bad name before any work (the cache may
        recipe_for(method, args.bits[0], 0)                    # hold names of earlier versions: render them as they are)
    if args.threads:
        torch.set_num_threads(args.threads)

    x_test, labels = test_set(args.limit)
    cache = ResultCache(args.cache)
    fps = {}
    for name in args.models:
        fp_logits = predict(load_reference(name), x_test)
        fps[name] = top1(fp_logits, labels)
        key = dict(model=name, calib=args.calib, test=len(labels))
        if args.render_only:
            todo = []
        elif args.remeasure:
            todo = [(seed, bits, method) for seed in args.seeds for bits in args.bits for method in args.methods]
        else:
            todo = cache.missing(args.seeds, args.bits, args.methods,
                                 require=("top1_lowered",) if args.lowered else (), **key)
        for seed, bits, method in todo:
            rec = cache.add(measure(name, method, bits, seed, args.calib, x_test, labels, fp_logits),
                            replaces=cache.get(seed=seed, bits=bits, method=method, **key))
            print(f"{name} {bits} {method} seed {seed}: {rec['top1']:.2f} % ({rec['seconds']:.0f} s)", flush=True)
            Path(args.out).write_text(render(cache, args, fps))
    Path(args.out).write_text(render(cache, args, fps))


if __name__ == "__main__":
    main()
