"""The ``vmq`` command.

Subcommands:
    vmq list                         model configurations, shipped reference models, recipes
    vmq quantize MODEL --recipe R    quantize (PTQ4VM or ViM-VQ), lower, save, export to ONNX, report; MODEL is a
                                     shipped reference model (Fashion-MNIST) or a checkpoint with --calib-dir
    vmq eval MODEL                   top-1 on Fashion-MNIST or a labelled folder (--eval-dir)
    vmq export-onnx MODEL -o F       ONNX export of a model or a saved quantized model, checked in onnxruntime
    vmq bench MODEL [MODEL ...]      forward latency (the first model is the baseline of the ratios)
    vmq reference NAME               evaluate a shipped model, export it, quantize it W8A8 and evaluate that
    vmq export MODEL [--batch N]     export a model configuration with torch.export and compare with eager
    vmq train CONFIG                 train a reference model on Fashion-MNIST

Every argument is checked before any work starts; an error is one line (``VMQ_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from vmq_fx.app.quiet import known_messages_silenced

__all__ = ["main"]

log = logging.getLogger("vmq_fx.app.cli")


def _cmd_list(args: argparse.Namespace) -> int:
    from vmq_fx.models import MODEL_CONFIGS, list_references, reference_card

    print("model configurations (--config of a checkpoint; vmq export / vmq train):")
    for name, cfg in sorted(MODEL_CONFIGS.items()):
        stride = f", stride {cfg.stride}" if getattr(cfg, "stride", None) else ""
        shape = (f"embed_dim {cfg.embed_dim}, depth {cfg.depth}{stride}, {cfg.num_tokens} tokens"
                 if hasattr(cfg, "embed_dim")
                 else f"dims {'-'.join(map(str, cfg.dims))}, depths {'-'.join(map(str, cfg.depths))}")
        print(f"  {name:18s} {type(cfg).__name__[:-6]:6s} {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, {shape}, "
              f"{cfg.num_classes} classes")
    print("shipped reference models (vmq reference / vmq eval / vmq quantize):")
    for name in list_references():
        card = reference_card(name)
        print(f"  {name:18s} {card['model']}, Fashion-MNIST test top-1 {card['test_top1']:.2f}%")
    from vmq_fx import recipes

    print("recipes (vmq quantize --recipe):")
    for pattern in recipes.names():
        print(f"  {pattern}")
    print("  and the optimization's settings: JLSSConfig / VQConfig fields, e.g. ptq4vm-w4a4[target=mixer,steps=50]")
    return 0


def _is_quantized_file(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return str((f.metadata() or {}).get("format", "")).startswith("vmq_fx.lowered/")
    except Exception:  # not safetensors: read_state_dict names the problem
        return False


def _load_model(args: argparse.Namespace, quantized_ok: bool = False):
    """The model ``args.model`` names: a shipped reference model, a checkpoint file (official Vim / VMamba or a
    vmq_fx state dict; ``--config`` optional, ``--ema``, ``--img-size``, ``--stride``), or, where ``quantized_ok``, a quantized model
    saved by ``vmq quantize``."""
    from vmq_fx.models import list_references, load_checkpoint, load_reference

    spec = args.model
    if spec in list_references():
        for option in ("config", "img_size", "stride"):
            if getattr(args, option, None):
                raise ValueError(f"--{option.replace('_', '-')} is for checkpoints; {spec} is a shipped reference "
                                 "model with its own configuration")
        if getattr(args, "ema", False):
            raise ValueError(f"--ema is for checkpoints; {spec} is a shipped reference model")
        return load_reference(spec)
    if not os.path.exists(spec):
        raise ValueError(f"unknown model {spec!r}: not a shipped reference model ({', '.join(list_references())}) "
                         "and no such file")
    if _is_quantized_file(spec):
        if not quantized_ok:
            raise ValueError(f"{spec} is a quantized model saved by vmq quantize; give the floating-point checkpoint")
        import vmq_fx

        return vmq_fx.load_quantized(spec)
    overrides = {k: getattr(args, k) for k in ("img_size", "stride") if getattr(args, k, None)}
    return load_checkpoint(spec, getattr(args, "config", None), use_ema=getattr(args, "ema", False), **overrides)


def _workload(args: argparse.Namespace, model, progress: bool):
    """Fashion-MNIST for the 28x28 reference models, else the user's folders."""
    from vmq_fx.app.workload import FashionMNISTWorkload, FolderWorkload, fashion_mnist_model

    calib_dir = getattr(args, "calib_dir", None)
    if calib_dir is None and getattr(args, "eval_dir", None) is None:
        if not fashion_mnist_model(model):
            size = model.config.img_size if hasattr(model, "config") else "its"
            raise ValueError(f"a model of {size}x{size} images needs your images: --calib-dir DIR (a folder of "
                             "images; add --eval-dir DIR, one subfolder per class, for accuracy)")
        return FashionMNISTWorkload(getattr(args, "calib", 256), args.limit, args.data_dir,
                                    seed=getattr(args, "calib_seed", 0))
    if calib_dir is None:
        raise ValueError("--eval-dir needs --calib-dir (the calibration images)")
    cfg = model.config
    return FolderWorkload(cfg.preprocess, cfg.num_classes, calib_dir, args.calib, args.calib_seed, args.eval_dir,
                          args.limit, workers=args.workers, progress=progress)


def _quantizer(recipe, args: argparse.Namespace):
    """The quantizer of one --recipe with the per-layer choices of --layer-recipe and --keep-float."""
    import vmq_fx
    from vmq_fx.pt2e.quantizer import ROLES

    quantizer = vmq_fx.VisualMambaQuantizer(recipe)
    for item in args.layer_recipe or []:
        where, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--layer-recipe {item!r}: expected ROLE=RECIPE or MODULE_PATTERN=RECIPE")
        layer_recipe = vmq_fx.recipes.from_name(name)
        quantizer = (quantizer.set_role(where, layer_recipe) if where in ROLES
                     else quantizer.set_module_name(where, layer_recipe))
    for where in args.keep_float or []:
        quantizer = quantizer.set_role(where, None) if where in ROLES else quantizer.set_module_name(where, None)
    quantizer._check_one_kind()
    return quantizer


def _method(name: str, args: argparse.Namespace):
    """The quantizer and the optimization config of one --recipe (its bracketed run-level fields, then --steps and
    --batch-size)."""
    import dataclasses

    from vmq_fx.pt2e.flow import method_from_name
    from vmq_fx.pt2e.recipes import family_of

    recipe, config = method_from_name(name)
    if args.steps is not None or args.batch_size is not None:
        if not recipe.optimizes:
            raise ValueError(f"--steps / --batch-size are for the optimization of JLSS / ViM-VQ; {name} has none")
        given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
        config = dataclasses.replace(config if config is not None else family_of(recipe).config_type()(), **given)
    return _quantizer(recipe, args), config


def _check_layer_choices(args: argparse.Namespace, model) -> None:
    """Each --keep-float / --layer-recipe WHERE must name a role or match a linear of the model (before any work)."""
    import fnmatch

    import torch

    from vmq_fx.pt2e.quantizer import ROLES

    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    wheres = [("--keep-float", w) for w in args.keep_float or []]
    wheres += [("--layer-recipe", item.partition("=")[0]) for item in args.layer_recipe or []]
    for option, where in wheres:
        if where not in ROLES and not any(n == where or fnmatch.fnmatchcase(n, where) for n in linears):
            raise ValueError(f"{option} {where!r}: neither a role ({', '.join(ROLES)}) nor the path of a linear of "
                             f"this model (e.g. {', '.join(linears[:3])})")


def _cmd_quantize(args: argparse.Namespace) -> int:
    import vmq_fx
    from vmq_fx import distributed
    from vmq_fx.app import report as plots
    from vmq_fx.pt2e.utils import example_images

    vmq_fx.pt2e.memory.huge_pages_for_large_tensors()  # before any tensor is made: fewer page faults
    chosen = [_method(name, args) for name in args.recipe]  # bad input fails here
    if not args.no_onnx:
        _require_onnx_ops(args.onnx_ops)
    if not args.keep_freed_memory:
        vmq_fx.pt2e.memory.return_freed_memory()  # a lower peak through calibration and block-wise learning
    # Under torchrun every process calibrates, optimizes and scores its share; rank 0 alone writes and reports.
    writer = distributed.is_main()
    progress = not args.quiet and writer
    model = _load_model(args)
    _check_layer_choices(args, model)
    workload = _workload(args, model, progress)
    out = Path(args.out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    workload.set_reference(model)
    fp = workload.score(model, progress)
    table = [f"| model | {workload.metric}, torch | onnxruntime | bits per weight, all in | quantization s | files |",
             "|---|---|---|---|---|---|", f"| FP32 | {fp} | - | 32 | - | - |"]
    notes, figures, points = [], [], []
    calib = workload.calibration
    example, diagnostic = example_images(calib, 2), example_images(calib, 32)  # read once for every recipe
    for name, (quantizer, config) in zip(args.recipe, chosen):
        log.info("%s: quantizing", name)
        res = vmq_fx.quantize(model, quantizer, calib, config, progress=progress, diagnostic_images=diagnostic)
        score = workload.score(res.lowered, progress)
        if not writer:
            continue
        sub = out / name
        sub.mkdir(exist_ok=True)
        vmq_fx.save_quantized(res.lowered, sub / "model.safetensors", model.config)
        files = [f"{name}/model.safetensors ({(sub / 'model.safetensors').stat().st_size / 1024:.0f} KB)"]
        ort = "-"
        if not args.no_onnx:
            onnx_res = vmq_fx.export_onnx(res.lowered, example, sub / "model.onnx", ops=args.onnx_ops)
            ort = str(workload.score_onnx(onnx_res.path, args.threads))
            files.append(f"{name}/model.onnx ({onnx_res.bytes / 1024:.0f} KB)")
        bits = vmq_fx.pt2e.diagnostics.bits_per_weight(res.lowered)
        table.append(f"| {name} (lowered) | {score} | {ort} | {bits:.2f} | {res.seconds:.0f} | {', '.join(files)} |")
        points.append((name, bits, score.value))
        if res.report is not None:
            notes.append(f"- {name}: {res.report}")
        png = f"layer_errors_{name}.png"
        plots.plot_layer_errors(res.errors_init, res.errors_final, out / png,
                                f"{Path(args.model).name} {name}: per-layer output error on 32 calibration images")
        figures.append(f"![{png}]({png})")
        scales = vmq_fx.pt2e.diagnostics.token_scales(res.prepared)
        if scales:
            png = f"token_scales_{name}.png"
            plots.plot_token_scales(scales, out / png, f"{Path(args.model).name} {name}: per-token activation step "
                                    "sizes", class_token=getattr(model, "token_position", None))
            figures.append(f"![{png}]({png})")
    if not writer:
        return 0
    if len(points) > 1:
        plots.plot_accuracy_vs_bits(points, fp.value, out / "accuracy_vs_bits.png",
                                    f"{Path(args.model).name}: {workload.metric.split(' (')[0]} vs bits")
        figures.append("![accuracy_vs_bits.png](accuracy_vs_bits.png)")
    processes = f" {distributed.world_size()} processes (torchrun)." if distributed.world_size() > 1 else ""
    report = [f"# {args.command_line}", "",
              f"{workload.description}{processes} Quantization time: calibration + optimization + convert + lower, "
              "this machine. "
              "Load a model with `vmq_fx.load_quantized(path)`.", "", *table, "", *notes, "", *figures, ""]
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

    from vmq_fx.pt2e.memory import reuse_freed_memory

    # Freed activations served again without page faults (by default glibc's heap can shrink and grow around them).
    malloc = "freed memory reused" if reuse_freed_memory() else "malloc as it comes"
    models = [(spec, _load_model(argparse.Namespace(model=spec), quantized_ok=True)) for spec in args.models]
    models = [(spec, model, _input_shape(model)) for spec, model in models]
    if args.runtime == "cpp":
        from vmq_fx.runtime import cpp_graph

        models = [(spec, cpp_graph(model, torch.randn(2, *shape)), shape) for spec, model, shape in models]
    runtime = "the C++ graph runner" if args.runtime == "cpp" else "Python"
    print(f"median forward latency over {args.reps} runs (torch, graphs run by {runtime}, {torch.get_num_threads()} "
          f"threads, {malloc})")
    print(f"{'model':<48} " + " ".join(f"{'b=' + str(b):>10}" for b in args.batch))
    base = None
    for spec, model, shape in models:
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


def _onnx_ops_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx-ops", choices=("onnx", "vmq"), default="onnx",
                        help="the operators of the ONNX file: standard ONNX only (onnx, portable: the selective scan "
                             "as a Scan), or the selective scans, causal convolutions and integer linears as ops of "
                             "vmq_fx's onnxruntime library (vmq: ~5x faster; no torch needed; needs `python -m "
                             "vmq_fx.export.ort_ops --fetch-headers` once)")


def _require_onnx_ops(ops: str) -> None:
    """``--onnx-ops vmq`` needs the onnxruntime custom-op library: build it (or say why not) before any work."""
    if ops == "vmq":
        from vmq_fx.export.ort_ops import custom_ops_library

        custom_ops_library()


def _check_output_file(path: str, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written as a file."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give the file to write (e.g. {target / 'model.onnx'})")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: its folder {target.parent} does not exist")


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    import vmq_fx
    from vmq_fx.export import ort_session

    _require_onnx_ops(args.onnx_ops)
    _check_output_file(args.output, "-o")
    model = _load_model(args, quantized_ok=True)
    shape = _input_shape(model)
    x = torch.randn(args.batch, *[int(d) for d in shape], generator=torch.Generator().manual_seed(0))
    res = vmq_fx.export_onnx(model, x, args.output, ops=args.onnx_ops)
    sess = ort_session(res.path, threads=args.threads)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    ops = ", ".join(f"{k} {v}" for k, v in sorted(res.op_counts.items()) if k in (
        "Scan", "SelectiveScan", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "MatMul", "Gather"))
    print(f"wrote {res.path}: {res.bytes / 1024:.0f} KB in {res.seconds:.1f} s; {ops}")
    print(f"onnxruntime vs torch on a batch of {args.batch}: relative error {rel:.2e}")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    import torch

    import vmq_fx
    from vmq_fx.app.data import calibration_images
    from vmq_fx.app.evaluate import evaluate
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
    from vmq_fx.app.train import TrainConfig, train_reference

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                      init_from=args.init_from)
    # shlex.join keeps the command copy-pasteable (the --conditions text has spaces)
    command = "vmq " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("vmq") else None
    card = train_reference(args.model, args.out_dir, args.name or args.model.replace("_", "-"), cfg, args.data_dir,
                           command=command, conditions=args.conditions)
    print(f"{card['name']}: Fashion-MNIST test top-1 {card['test_top1']:.2f}% ({card['test_correct']}/10000); "
          f"trained {card['train']['seconds'] / 60:.1f} min; wrote {args.out_dir}/{card['name']}.safetensors and .json")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vmq_fx import distributed
    from vmq_fx.app.evaluate import evaluate, evaluate_folder
    from vmq_fx.app.images import ImageFolder
    from vmq_fx.pt2e.memory import reuse_freed_memory

    reuse_freed_memory()  # inference: freed activations served again without page faults
    model = _load_model(args, quantized_ok=True)
    progress = not args.quiet and distributed.is_main()
    if args.eval_dir:
        cfg = model.config if hasattr(model, "config") else model.meta["vmq_config"]
        folder = ImageFolder.open(args.eval_dir, cfg.num_classes, cfg.preprocess)
        if args.limit:
            folder.files, folder.labels = folder.files[:args.limit], folder.labels[:args.limit]
        result = evaluate_folder(model, folder, workers=args.workers, progress=progress)
    else:
        if not _fashion_mnist_input(model):
            raise ValueError(f"{args.model} does not take 28x28 Fashion-MNIST images: give --eval-dir DIR (one "
                             "subfolder per class)")
        result = evaluate(model, limit=args.limit, data_dir=args.data_dir, progress=progress)
    if distributed.is_main():
        print(f"{args.model}: {result}" + (f" ({distributed.world_size()} processes)"
                                           if distributed.world_size() > 1 else ""))
    return 0


def _fashion_mnist_input(model) -> bool:
    return _input_shape(model) == (1, 28, 28)


def _threads(text: str) -> int:
    """An argparse type: ``auto`` (0 inside: torch's and onnxruntime's defaults, all cores) or a count >= 1."""
    if text.strip().lower() == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or auto (all cores), got {n}")
    return n


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (checked when the command line is read)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n
    return parse


def _out_dir(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def _folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if Path(text).exists() else f"no folder {text}")
    return text


class _Parser(argparse.ArgumentParser):
    """Errors in one line (argparse's default prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"vmq: error: {self.prog.split(' ', 1)[-1]}: {message}\n")


def _model_args(p: argparse.ArgumentParser, quantized: bool) -> None:
    what = "a quantized .safetensors from `vmq quantize`, " if quantized else ""
    p.add_argument("model", help=f"a shipped reference model (vim-fm-tiny), {what}or a checkpoint file: official "
                                 "Vim / VMamba .pth (as released or as their training scripts save it) or a state dict")
    p.add_argument("--config", help="the checkpoint's configuration (see `vmq list`; default: inferred from its shapes)")
    p.add_argument("--ema", action="store_true", help="load the checkpoint's model_ema weights")
    p.add_argument("--img-size", type=_count(1), help="input size of a VMamba checkpoint (default 224), or of a Vim "
                                                      "checkpoint whose stride is not the one inferred")
    p.add_argument("--stride", type=_count(1), help="patch stride of a Vim checkpoint (its tensors do not fix it: "
                                                    "default the named configuration's, else the patch size)")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-dir", type=_folder, help="labelled images, one subfolder per class (ImageNet WordNet-id "
                                                    "folders map to the 1000 ImageNet classes)")
    p.add_argument("--workers", type=_count(0), help="image decoding processes (default: up to 4)")
    p.add_argument("--limit", type=_count(1), help="score on the first N evaluation images only")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (the reference models; default: $VMQ_DATA_DIR or the "
                                      "Debian location)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmq", description="Quantize and export Visual Mamba models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_threads, default="auto",
                        help="CPU threads for torch and onnxruntime (a count, or auto: their defaults, all cores)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=lambda **kw: _Parser(parents=[common], **kw))
    sub.add_parser("list", help="list known models").set_defaults(fn=_cmd_list)
    r = sub.add_parser("reference", help="evaluate, export and quantize (W8A8) a shipped reference model")
    r.add_argument("name", help="reference model name, e.g. vim-fm-tiny")
    r.add_argument("--calib", type=_count(1), default=256, help="calibration images (training split)")
    r.add_argument("--data-dir", help="Fashion-MNIST directory")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=_cmd_reference)
    e = sub.add_parser("export", help="export a model configuration with torch.export and compare it with eager")
    e.add_argument("model", help="model configuration (see `vmq list`)")
    e.add_argument("--batch", type=_count(1), default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", help="save the ExportedProgram (.pt2)")
    e.set_defaults(fn=_cmd_export)
    t = sub.add_parser("train", help="train a reference model on Fashion-MNIST (CPU)")
    t.add_argument("model", help="model configuration name, e.g. vim_fm_tiny")
    t.add_argument("--name", help="reference name of the result (default: the config name with dashes)")
    t.add_argument("--out-dir", type=_out_dir, default="vmq_fx/models/reference")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--batch-size", type=_count(1), default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init-from", help="continue from a checkpoint written by `vmq train` (.safetensors with its "
                                       ".json card beside it) or a shipped reference name; the new card embeds its card")
    t.add_argument("--conditions", help="note for the model card on how the run was made (what shared the CPU)")
    t.add_argument("--data-dir", help="Fashion-MNIST directory (default: $VMQ_DATA_DIR or the Debian location)")
    t.set_defaults(fn=_cmd_train)
    v = sub.add_parser("eval", help="top-1 on a labelled image folder, or on Fashion-MNIST for the reference models")
    _model_args(v, quantized=True)
    _image_args(v)
    v.set_defaults(fn=_cmd_eval)
    q = sub.add_parser("quantize", help="quantize a model, save it, export it to ONNX and write a report")
    _model_args(q, quantized=False)
    q.add_argument("--recipe", required=True, nargs="+",
                   help="one or more methods, e.g. ptq4vm-w8a8 ptq4vm-w4a8 vimvq-2bit[steps=50] (see `vmq list`; "
                        "bracketed fields set the recipe's or the optimization's settings)")
    q.add_argument("--calib-dir", type=_folder, help="a folder of your images to calibrate with, searched with its "
                                                    "subfolders (flat, or a training set's class folders: labels are "
                                                    "not used); needed for any model but the shipped Fashion-MNIST "
                                                    "ones")
    q.add_argument("--calib", type=_count(1), default=256, help="calibration images (drawn with --calib-seed from "
                                                                 "--calib-dir, or the Fashion-MNIST training split)")
    q.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample")
    _image_args(q)
    q.add_argument("--steps", type=_count(0), help="optimization steps per block (JLSS / ViM-VQ; default: "
                                                   "JLSS 100 on Vim and 400 on VMamba, ViM-VQ 400)")
    q.add_argument("--batch-size", type=_count(1), help="images per optimization step (default: JLSS all, ViM-VQ 64)")
    q.add_argument("--layer-recipe", nargs="+", metavar="WHERE=RECIPE",
                   help="mixed precision: another recipe for a role (in_proj, x_proj, dt_proj, out_proj, fc1, fc2) or "
                        "module paths (fnmatch pattern), e.g. dt_proj=ptq4vm-w8a8")
    q.add_argument("--keep-float", nargs="+", metavar="WHERE",
                   help="roles or module paths (fnmatch pattern) left in floating point, e.g. x_proj")
    q.add_argument("--no-onnx", action="store_true", help="do not export model.onnx")
    _onnx_ops_arg(q)
    q.add_argument("--keep-freed-memory", action="store_true",
                   help="leave glibc's malloc as it comes (by default large tensors go back to the system when freed): "
                        "peak memory per process 10-25 %% higher, JLSS / ViM-VQ a few %% faster")
    q.add_argument("--out-dir", type=_out_dir, required=True, help="output folder")
    q.set_defaults(fn=_cmd_quantize)
    o = sub.add_parser("export-onnx", help="export a model or a saved quantized model to ONNX, check in onnxruntime")
    _model_args(o, quantized=True)
    o.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    o.add_argument("--batch", type=_count(2), default=2, help="example batch (the exported batch stays dynamic)")
    _onnx_ops_arg(o)
    o.set_defaults(fn=_cmd_export_onnx)
    b = sub.add_parser("bench", help="forward latency of models (the first is the baseline of the ratios)")
    b.add_argument("models", nargs="+", help="reference model names, checkpoints or quantized .safetensors files")
    b.add_argument("--batch", type=_count(1), nargs="+", default=[1, 64])
    b.add_argument("--reps", type=_count(1), default=7)
    b.add_argument("--runtime", choices=("python", "cpp"), default="python",
                   help="run each model's graph as Python (a graph module; reference models eager) or by vmq_fx's C++ "
                        "graph runner (vmq_fx.runtime; reference models exported first): the same results, 1.1-1.3x "
                        "faster at batch 1")
    b.set_defaults(fn=_cmd_bench)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not to the stream of the first ``main()``: a caller that
    swaps stderr (a test's capture, a notebook) and closes it never leaves the handler writing into a closed file."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


@contextlib.contextmanager
def _logging_to_stderr(quiet: bool):
    """vmq_fx's notes (kernel builds, inferred configurations, warnings) on stderr while one command runs; warnings
    only with --quiet. The logger is as it was afterwards: a handler left behind would outlive the command's stream."""
    logger = logging.getLogger("vmq_fx")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("vmq: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vmq`` console script; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        args.command_line = "vmq " + shlex.join(sys.argv[1:] if argv is None else argv)  # for reports
    except SystemExit as e:  # argparse: --help (0) or a one-line error (2)
        return int(e.code or 0)
    with _logging_to_stderr(getattr(args, "quiet", False)), known_messages_silenced():
        return _run(args)


# The commands that run under torchrun (several processes, one result): the others refuse it.
_DISTRIBUTED_COMMANDS = ("eval", "quantize")


def _run(args) -> int:
    from vmq_fx import distributed

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if distributed.launched() and args.command not in _DISTRIBUTED_COMMANDS:
            raise ValueError(f"vmq {args.command} does not run under torchrun yet (only "
                             f"{', '.join('vmq ' + c for c in _DISTRIBUTED_COMMANDS)} does): run it as one process")
        distributed.init_from_env()
        return args.fn(args)
    except (ValueError, OSError, RuntimeError, TypeError, ImportError) as e:
        # One line for people; the traceback is for developers (VMQ_DEBUG=1).
        if os.environ.get("VMQ_DEBUG"):
            raise
        text = str(e).strip() or type(e).__name__
        # one line, unless the error's own indented lines are its detail (the keys of a checkpoint mismatch)
        print(f"vmq: error: {text if getattr(e, 'cli_detail', False) else text.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmq: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
