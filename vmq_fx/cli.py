"""The ``vmq`` command.

Subcommands:
    vmq list                         models and shipped reference models
    vmq reference NAME               the main job: evaluate a shipped model, export it, evaluate the exported
                                     program, quantize it (W8A8, lowered to vmq::int8_linear), evaluate that
    vmq eval NAME                    top-1 of a shipped reference model on the Fashion-MNIST test set
    vmq export MODEL [--batch N]     export a model configuration with torch.export, run both, print the comparison
    vmq train CONFIG                 train a reference model on Fashion-MNIST
    vmq quantize MODEL --recipe R    quantize (PTQ4VM or ViM-VQ), lower, save, export to ONNX, report
    vmq export-onnx MODEL -o F       ONNX export of a reference model or a saved quantized model, checked in onnxruntime
    vmq bench MODEL [MODEL ...]      forward latency (the first model is the baseline of the ratios)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from vmq_fx.models import MODEL_CONFIGS, list_references, reference_card

    print("model configurations (vmq export / vmq train):")
    for name, cfg in sorted(MODEL_CONFIGS.items()):
        print(f"  {name:16s} {cfg}")
    print("shipped reference models (vmq reference / vmq eval / vmq quantize):")
    for name in list_references():
        card = reference_card(name)
        print(f"  {name:16s} {card['model']}, Fashion-MNIST test top-1 {card['test_top1']:.2f}%")
    from vmq_fx.quantizer import recipes

    print("recipes (vmq quantize --recipe):")
    for pattern in recipes.names():
        print(f"  {pattern}")
    return 0


def _load_model(spec: str, config: str | None):
    """A shipped reference model by name, or a checkpoint file (safetensors or torch) of ``config``."""
    import os

    from vmq_fx.models import create_model, list_references, load_reference, load_state_dict_strict

    if spec in list_references():
        return load_reference(spec)
    if not os.path.exists(spec):
        raise ValueError(f"unknown model {spec!r}: not a shipped reference model ({', '.join(list_references())}) "
                         "and no such file")
    if not config:
        raise ValueError(f"{spec}: a checkpoint file needs --config (a configuration from `vmq list`)")
    try:
        if spec.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(spec)
        else:
            import torch

            state = torch.load(spec, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
    except Exception as e:  # unreadable file: name it
        raise ValueError(f"could not read checkpoint {spec}: {str(e).splitlines()[0]}") from e
    model = create_model(config)
    load_state_dict_strict(model, state, source=spec)
    return model.eval()


def _top1(model, images, labels, progress: bool) -> float:
    from vmq_fx.evaluate import predict

    with __import__("torch").no_grad():
        logits = predict(model, images, progress=progress)
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def _onnx_top1(path, images, labels, threads: int = 0) -> float:
    import torch

    from vmq_fx.export import ort_session

    sess = ort_session(path, threads=threads)
    feed = sess.get_inputs()[0].name
    logits = torch.cat([torch.from_numpy(sess.run(None, {feed: c.numpy()})[0]) for c in images.split(500)])
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import vmq_fx
    from vmq_fx import report as plots
    from vmq_fx.data import calibration_images, fashion_mnist, normalize

    chosen = [vmq_fx.recipes.from_name(name) for name in args.recipe]  # bad names fail before any work
    model = _load_model(args.model, args.config)
    progress = not args.quiet
    images, labels = fashion_mnist("test", args.data_dir)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    x_test = normalize(images)
    calib = calibration_images(args.calib, data_dir=args.data_dir)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp_top1 = _top1(model, x_test, labels, progress)
    table = ["| model | top-1 % torch | top-1 % onnxruntime | quantization s | files |", "|---|---|---|---|---|",
             f"| FP32 | {fp_top1:.2f} | - | - | - |"]
    notes, figures, points = [], [], []
    for name, recipe in zip(args.recipe, chosen):
        res = vmq_fx.quantize(model, recipe, calib, optimize=not args.no_optimize, steps=args.steps,
                              batch_size=args.batch_size, progress=progress, diagnostic_images=calib[:32])
        sub = out / name
        sub.mkdir(exist_ok=True)
        vmq_fx.save_quantized(res.lowered, sub / "model.safetensors", model.config)
        files = [f"{name}/model.safetensors ({(sub / 'model.safetensors').stat().st_size / 1024:.0f} KB)"]
        top1 = _top1(res.lowered, x_test, labels, progress)
        ort_top1 = "-"
        if not args.no_onnx:
            onnx_res = vmq_fx.export_onnx(res.lowered, x_test[:2], sub / "model.onnx")
            ort_top1 = f"{_onnx_top1(onnx_res.path, x_test, labels, args.threads):.2f}"
            files.append(f"{name}/model.onnx ({onnx_res.bytes / 1024:.0f} KB)")
        table.append(f"| {name} (lowered) | {top1:.2f} | {ort_top1} | {res.seconds:.0f} | {', '.join(files)} |")
        points.append((name, getattr(recipe, "w_bits", None) or recipe.index_bits, top1))
        if res.report is not None:
            notes.append(f"- {name}: {res.report}")
        png = f"layer_errors_{name}.png"
        plots.plot_layer_errors(res.errors_init, res.errors_final, out / png,
                                f"{args.model} {name}: per-layer output error on 32 calibration images")
        figures.append(f"![{png}]({png})")
        scales = plots.token_scales(res.prepared)
        if scales:
            png = f"token_scales_{name}.png"
            plots.plot_token_scales(scales, out / png, f"{args.model} {name}: per-token activation step sizes")
            figures.append(f"![{png}]({png})")
    if len(points) > 1:
        plots.plot_accuracy_vs_bits(points, fp_top1, out / "accuracy_vs_bits.png", f"{args.model}: top-1 vs bits")
        figures.append("![accuracy_vs_bits.png](accuracy_vs_bits.png)")
    report = [f"# vmq quantize {args.model} --recipe {' '.join(args.recipe)}", "",
              f"Top-1 on {len(labels)} Fashion-MNIST test images; {args.calib} calibration images from the training "
              "split. Quantization time: calibration + optimization + convert + lower, this machine. Load a model "
              "with `vmq_fx.load_quantized(path)`.", "", *table, "", *notes, "", *figures, ""]
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(table))
    print(f"wrote {out / 'report.md'}")
    return 0


def _input_shape(model) -> tuple[int, ...]:
    if hasattr(model, "config"):
        return (model.config.in_chans, model.config.img_size, model.config.img_size)
    val = next(n for n in model.graph.nodes if n.op == "placeholder").meta["val"]
    return tuple(int(d) for d in val.shape[1:])


def _cmd_bench(args: argparse.Namespace) -> int:
    import statistics
    import time

    import torch

    models = [(spec, _load_any(spec, None)) for spec in args.models]
    print(f"median forward latency over {args.reps} runs (torch, {torch.get_num_threads()} threads)")
    print(f"{'model':<48} " + " ".join(f"{'b=' + str(b):>10}" for b in args.batch))
    base = None
    for spec, model in models:
        shape = _input_shape(model)
        row = []
        for b in args.batch:
            x = torch.randn(b, *shape)
            times = []
            with torch.no_grad():
                model(x)
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t0)
            row.append(statistics.median(times))
        base = base or row
        cells = " ".join(f"{t * 1e3:7.1f} ms" + (f" ({base[i] / t:.2f}x)" if spec != args.models[0] else "")
                         for i, t in enumerate(row))
        print(f"{spec:<48} {cells}")
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    import vmq_fx
    from vmq_fx.export import ort_session

    model = _load_any(args.model, args.config)
    shape = _input_shape(model)
    x = torch.randn(args.batch, *[int(d) for d in shape], generator=torch.Generator().manual_seed(0))
    res = vmq_fx.export_onnx(model, x, args.output)
    sess = ort_session(res.path, threads=args.threads)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    ops = ", ".join(f"{k} {v}" for k, v in sorted(res.op_counts.items()) if k in (
        "Scan", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "MatMul", "Gather"))
    print(f"wrote {res.path}: {res.bytes / 1024:.0f} KB in {res.seconds:.1f} s; {ops}")
    print(f"onnxruntime vs torch on a batch of {args.batch}: relative error {rel:.2e}")
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

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                      init_from=args.init_from)
    # shlex.join keeps the command copy-pasteable (the --conditions text has spaces)
    command = "vmq " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("vmq") else None
    train_reference(args.model, args.out_dir, args.name or args.model.replace("_", "-"), cfg, args.data_dir,
                    command=command, conditions=args.conditions)
    return 0


def _load_any(spec: str, config: str | None):
    """A saved quantized model (``vmq quantize`` output), a shipped reference model, or a checkpoint file."""
    import os

    if spec.endswith(".safetensors") and os.path.isfile(spec) and not config:
        import vmq_fx

        return vmq_fx.load_quantized(spec)
    return _load_model(spec, config)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vmq_fx.evaluate import evaluate

    model = _load_any(args.model, args.config)
    print(f"{args.model}: {evaluate(model, limit=args.limit, data_dir=args.data_dir, progress=not args.quiet)}")
    return 0


def _threads(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (the default) or a positive number of threads, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmq", description="Quantize and export Visual Mamba models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_threads, default=0,
                        help="CPU threads for torch and onnxruntime (0: their defaults, all cores)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=lambda **kw: argparse.ArgumentParser(
        parents=[common], **kw))
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
    t.add_argument("--init-from", help="continue from a checkpoint written by `vmq train` (.safetensors with its "
                                       ".json card beside it) or a shipped reference name; the new card embeds its card")
    t.add_argument("--conditions", help="note for the model card on how the run was made (what shared the CPU)")
    t.add_argument("--data-dir", help="Fashion-MNIST directory (default: $VMQ_DATA_DIR or the Debian location)")
    t.set_defaults(fn=_cmd_train)
    v = sub.add_parser("eval", help="top-1 of a shipped reference model on the Fashion-MNIST test set")
    v.add_argument("model", help="reference model name (vim-fm-tiny), a quantized .safetensors from `vmq quantize`, "
                                 "or a checkpoint with --config")
    v.add_argument("--config", help="model configuration of a checkpoint file")
    v.add_argument("--limit", type=int, help="only the first N test images")
    v.add_argument("--data-dir", help="Fashion-MNIST directory")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(fn=_cmd_eval)
    q = sub.add_parser("quantize", help="quantize a model, save it, export it to ONNX and write a report")
    q.add_argument("model", help="shipped reference model name, or a checkpoint file with --config")
    q.add_argument("--recipe", required=True, nargs="+",
                   help="one or more, e.g. ptq4vm-w8a8 ptq4vm-w4a8 vimvq-2bit (see `vmq list`)")
    q.add_argument("--config", help="model configuration of a checkpoint file (see `vmq list`)")
    q.add_argument("--calib", type=int, default=256, help="calibration images from the training split")
    q.add_argument("--steps", type=int, help="optimization steps per block (JLSS / ViM-VQ; default: the recipe's)")
    q.add_argument("--batch-size", type=int, help="images per optimization step (default: JLSS all, ViM-VQ 64)")
    q.add_argument("--no-optimize", action="store_true", help="PTQ4VM recipes: skip JLSS (SmoothQuant + PTS)")
    q.add_argument("--no-onnx", action="store_true", help="do not export model.onnx")
    q.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    q.add_argument("--out-dir", required=True, help="output directory")
    q.add_argument("--data-dir", help="Fashion-MNIST directory")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_cmd_quantize)
    o = sub.add_parser("export-onnx", help="export a model or a saved quantized model to ONNX, check in onnxruntime")
    o.add_argument("model", help="reference model name, a quantized .safetensors from `vmq quantize`, or a "
                                 "checkpoint with --config")
    o.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    o.add_argument("--config", help="model configuration of a checkpoint file")
    o.add_argument("--batch", type=int, default=2, help="example batch (the exported batch stays dynamic)")
    o.set_defaults(fn=_cmd_export_onnx)
    b = sub.add_parser("bench", help="forward latency of models (the first is the baseline of the ratios)")
    b.add_argument("models", nargs="+", help="reference model names or quantized .safetensors files")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    b.add_argument("--reps", type=int, default=7)
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vmq`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, ImportError) as e:
        # One line for people; the traceback is for developers (python -X dev / VMQ_DEBUG=1).
        import os

        if os.environ.get("VMQ_DEBUG"):
            raise
        print(f"vmq: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
