"""The ``vmq`` command.

Subcommands:
    vmq list                         models and shipped reference models
    vmq reference NAME               the main job: evaluate a shipped model, export it, evaluate the exported
                                     program, quantize it (W8A8, lowered to vmq::int8_linear), evaluate that
    vmq eval NAME                    top-1 of a shipped reference model on the Fashion-MNIST test set
    vmq export MODEL [--batch N]     export a model configuration with torch.export, run both, print the comparison
    vmq train CONFIG                 train a reference model on Fashion-MNIST
"""
from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from vmq_fx.models import MODEL_CONFIGS, list_references, reference_card

    print("model configurations (vmq export / vmq train):")
    for name, cfg in sorted(MODEL_CONFIGS.items()):
        print(f"  {name:16s} {cfg}")
    print("shipped reference models (vmq reference / vmq eval):")
    for name in list_references():
        card = reference_card(name)
        print(f"  {name:16s} {card['model']}, Fashion-MNIST test top-1 {card['test_top1']:.2f}%")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    import torch

    import vmq_fx
    from vmq_fx.data import calibration_images
    from vmq_fx.evaluate import evaluate
    from vmq_fx.models import load_reference, reference_card

    progress = not args.quiet
    card = reference_card(args.name)
    model = load_reference(args.name)
    rows = []

    def add(label, result, note=""):
        rows.append((label, f"{result.top1:.2f}", f"{result.seconds:.1f}", note))
        if progress:
            print(f"{label}: {result}", flush=True)

    add("FP32 eager", evaluate(model, data_dir=args.data_dir, progress=progress), f"model card: {card['test_top1']:.2f}")
    calib = calibration_images(args.calib, data_dir=args.data_dir)
    t0 = time.perf_counter()
    ep = vmq_fx.export_model(model, calib[:2])
    export_s = time.perf_counter() - t0
    scans = sum(n.target is torch.ops.vmq.selective_scan.default for n in ep.graph.nodes)
    exported = ep.module()
    add("FP32 torch.export", evaluate(exported, data_dir=args.data_dir, progress=progress),
        f"{scans} vmq.selective_scan nodes, export {export_s:.1f} s")
    t0 = time.perf_counter()
    prepared = vmq_fx.prepare_pt2e(exported, vmq_fx.VisualMambaQuantizer(vmq_fx.recipes.smoothquant_pts(8, 8)))
    vmq_fx.calibrate(prepared, calib, progress=progress)
    lowered = vmq_fx.lower(vmq_fx.convert_pt2e(prepared))
    quant_s = time.perf_counter() - t0
    n_int8 = sum(n.target is torch.ops.vmq.int8_linear.default for n in lowered.graph.nodes)
    add("W8A8 SmoothQuant+PTS, lowered", evaluate(lowered, data_dir=args.data_dir, progress=progress),
        f"{n_int8} vmq.int8_linear nodes, quantized in {quant_s:.1f} s")
    width = max(len(r[0]) for r in rows)
    print(f"\n{args.name} on the Fashion-MNIST test set (10,000 images)")
    print(f"{'model':<{width}}  top-1 %  eval s  notes")
    for label, acc, secs, note in rows:
        print(f"{label:<{width}}  {acc:>7}  {secs:>6}  {note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from vmq_fx.export import export_model
    from vmq_fx.models import create_model

    torch.manual_seed(args.seed)
    model = create_model(args.model).eval()
    cfg = model.config
    x = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    t0 = time.perf_counter()
    ep = export_model(model, x)
    export_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(x)
        eager_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = ep.module()(x)
        exported_s = time.perf_counter() - t0
    counts = {}
    for node in ep.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    params = sum(p.numel() for p in model.parameters())
    rel = ((out - ref).norm() / ref.norm()).item()
    rows = [
        ("model", f"{args.model} ({params / 1e6:.1f} M parameters, {cfg.img_size}x{cfg.img_size}, batch {args.batch})"),
        ("vmq.selective_scan nodes", counts.get("vmq.selective_scan.default", 0)),
        ("aten.linear nodes", counts.get("aten.linear.default", 0)),
        ("graph nodes (call_function)", sum(counts.values())),
        ("torch.export time", f"{export_s:.1f} s"),
        ("eager forward", f"{eager_s * 1e3:.0f} ms"),
        ("exported forward", f"{exported_s * 1e3:.0f} ms"),
        ("max |eager - exported|", f"{(out - ref).abs().max().item():.3g}"),
        ("relative error (L2)", f"{rel:.3g}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.output:
        torch.export.save(ep, args.output)
        print(f"saved exported program to {args.output}")
    if rel >= 1e-4:
        print(f"vmq: error: exported program differs from eager (relative error {rel:.3g})", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vmq_fx.train import TrainConfig, train_reference

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    command = "vmq " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("vmq") else None
    train_reference(args.model, args.out_dir, args.name or args.model.replace("_", "-"), cfg, args.data_dir,
                    command=command)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vmq_fx.evaluate import evaluate
    from vmq_fx.models import load_reference

    model = load_reference(args.model)
    print(f"{args.model}: {evaluate(model, limit=args.limit, data_dir=args.data_dir, progress=not args.quiet)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmq", description="Quantize and export Visual Mamba models.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list known models").set_defaults(fn=_cmd_list)
    r = sub.add_parser("reference", help="the main job on a shipped reference model")
    r.add_argument("name", help="reference model name, e.g. vim-fm-tiny")
    r.add_argument("--calib", type=int, default=256, help="calibration images (training split)")
    r.add_argument("--data-dir", help="Fashion-MNIST directory")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=_cmd_reference)
    e = sub.add_parser("export", help="export a model with torch.export and compare it with eager")
    e.add_argument("model", help="model name (see `vmq list`)")
    e.add_argument("--batch", type=int, default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", help="save the ExportedProgram (.pt2)")
    e.set_defaults(fn=_cmd_export)
    t = sub.add_parser("train", help="train a reference model on Fashion-MNIST (CPU)")
    t.add_argument("model", help="model configuration name, e.g. vim_fm_tiny")
    t.add_argument("--name", help="reference name of the result (default: the config name with dashes)")
    t.add_argument("--out-dir", default="vmq_fx/models/reference")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    t.add_argument("--data-dir", help="Fashion-MNIST directory (default: $VMQ_DATA_DIR or the Debian location)")
    t.set_defaults(fn=_cmd_train)
    v = sub.add_parser("eval", help="top-1 of a shipped reference model on the Fashion-MNIST test set")
    v.add_argument("model", help="reference model name, e.g. vim-fm-tiny")
    v.add_argument("--limit", type=int, help="only the first N test images")
    v.add_argument("--data-dir", help="Fashion-MNIST directory")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vmq`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # One line for people; the traceback is for developers (python -X dev / VMQ_DEBUG=1).
        import os

        if os.environ.get("VMQ_DEBUG"):
            raise
        print(f"vmq: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
