"""The real workload at 224x224: a Vim-T and a VMamba v2v-T checkpoint and a folder of images, stage by stage.

    python bench/real_workload.py [--models vim_tiny vmambav2v_tiny] [--calib 256] [--threads 1] [--out ...]

Per model (random weights, saved as their official training scripts save checkpoints: Vim as is, VMamba in the
released stacked layout) and per recipe (SmoothQuant + PTS W8A8, PTQ4VM W4A8, ViM-VQ 2-bit): wall time and peak
resident memory of every stage (load, read images, export, prepare, calibrate, JLSS / ViM-VQ, convert, lower, save,
ONNX export), JLSS / ViM-VQ time per block and per step on a reduced schedule with the time the papers' schedules would
take projected from it, the lowered model against the fake-quantized one (top-1 agreement and relative logit error
on 16 held-out images), file sizes and bits per weight all-in.

The calibration folder holds ``--calib`` JPEGs made from the 20 labelled ImageNet photos of the foolbox wheel by
seeded random crops (30-100 % of the area) and flips, so that the images are real photographs of realistic size.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line  # noqa: E402

import torch  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes  # noqa: E402
from vmq_fx.app.images import ImageFiles, calibration_batch  # noqa: E402
from vmq_fx.pt2e.memory import PeakRSS  # noqa: E402
from vmq_fx.models import create_model, load_checkpoint  # noqa: E402
from vmq_fx.pt2e.diagnostics import bits_per_weight  # noqa: E402

REDUCED_STEPS, REDUCED_BATCH = 4, 32  # the optimization schedule run here (per block)
PAPERS = {"jlss_vim": (100, 256), "jlss_vmamba": (400, 256), "vimvq": (100, 64)}  # steps per block, batch


def make_photo_folder(folder: Path, n: int, seed: int = 0) -> None:
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("needs foolbox's photos: pip install --no-deps foolbox==3.3.4")
    photos = sorted(Path(next(iter(spec.submodule_search_locations))).joinpath("data").glob("imagenet_*.jpg"))
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        area = rng.uniform(0.3, 1.0) * w * h
        cw = int(min(w, max(64, (area * rng.uniform(0.75, 1.33)) ** 0.5)))
        ch = int(min(h, max(64, area / cw)))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(folder / f"calib_{i:04d}.jpg", quality=92)


class _Captured(logging.Handler):
    """The messages of one logger while active (the calibration's time per phase)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


class Stages:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        self.rows.append((name, seconds, rss.peak / 2**30))
        print(f"  {name}: {seconds:.1f} s, peak RSS {rss.peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        return out


def _official_checkpoint(model, family: str, path: Path) -> None:
    state = model.state_dict()
    if family == "vmamba":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_checkpoints import official_vmamba_layout

        state = official_vmamba_layout(state)
    torch.save({"model": state, "args": argparse.Namespace(model=family)}, path)


def bench_model(name: str, args, folder: Path, work: Path) -> list[str]:
    family = "vim" if name.startswith("vim") else "vmamba"
    torch.manual_seed(0)
    ckpt = work / f"{name}.pth"
    _official_checkpoint(create_model(name), family, ckpt)
    st = Stages()
    model = st.run("load checkpoint", lambda: load_checkpoint(ckpt))
    files = ImageFiles.open(folder, model.config.preprocess)
    calib = st.run(f"read {args.calib} images", lambda: calibration_batch(files.sample(args.calib)))
    held_out = calib[-16:]
    gm = st.run("torch.export", lambda: vmq_fx.export_model(model, calib[:2]).module())
    lines = [f"## {name} (224x224, random weights; {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
             "parameters)", ""]
    results = []
    for label, recipe in (("sq-pts W8A8", recipes.smoothquant_pts(8, 8)), ("PTQ4VM W4A8", recipes.ptq4vm(4, 8)),
                          ("ViM-VQ 2-bit", recipes.vimvq(2))):
        print(f"{name} {label}", file=sys.stderr, flush=True)
        rs = Stages()
        prepared = rs.run("prepare", lambda: prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipe)))
        with _Captured("vmq_fx.pt2e.calibrate") as phases:
            rs.run("calibrate", lambda: vmq_fx.calibrate(prepared, calib, batch_size=32, progress=False))
        report, projection = None, ""
        if recipe.optimizes:
            vq = isinstance(recipe, vmq_fx.VQRecipe)
            optimize = vmq_fx.vector_quantize if vq else vmq_fx.jlss
            reduced = (vmq_fx.VQConfig if vq else vmq_fx.JLSSConfig)(steps=REDUCED_STEPS, batch_size=REDUCED_BATCH)
            steps, batch = PAPERS["vimvq" if vq else f"jlss_{family}"]
            # The same optimization with no step, on a copy: the per-block cost that does not depend on the
            # schedule (capturing each block's inputs and targets, the loss before and after).
            fixed = rs.run("captures alone (0 steps, on a copy)", lambda: optimize(
                copy.deepcopy(prepared), calib, dataclasses.replace(reduced, steps=0), progress=False))
            name_ = f"{'ViM-VQ' if vq else 'JLSS'} ({REDUCED_STEPS} steps x {REDUCED_BATCH} images per block)"
            report = rs.run(name_, lambda: optimize(prepared, calib, reduced, progress=False))
            seconds, fixed_s, blocks = rs.rows[-1][1], rs.rows[-2][1], report.blocks
            per_step = max(seconds - fixed_s, 0.0) / (blocks * REDUCED_STEPS)
            projected = fixed_s + per_step * batch / REDUCED_BATCH * steps * blocks
            projection = (f"{blocks} blocks; captures {fixed_s / blocks:.1f} s per block; "
                          f"{per_step:.2f} s per step of {REDUCED_BATCH} images; the paper's schedule ({steps} "
                          f"steps x {batch} images per block) projected at {projected / 60:.0f} min (step time taken "
                          "as linear in the batch)")
        with torch.no_grad():
            fake = prepared(held_out)
        quantized = rs.run("convert_pt2e", lambda: convert_pt2e(prepared))
        lowered = rs.run("lower", lambda: vmq_fx.lower(quantized))
        with torch.no_grad():
            out = lowered(held_out)
        agree = 100.0 * float((out.argmax(-1) == fake.argmax(-1)).float().mean())
        rel = float((out - fake).norm() / fake.norm())
        path = work / f"{name}_{label.replace(' ', '_')}.safetensors"
        rs.run("save", lambda: vmq_fx.save_quantized(lowered, path, model.config))
        onnx = rs.run("ONNX export", lambda: vmq_fx.export_onnx(lowered, calib[:2], work / f"{path.stem}.onnx"))
        results.append((label, rs.rows, projection, agree, rel, path.stat().st_size, onnx.bytes,
                        bits_per_weight(lowered), "; ".join(phases.messages)))
    fp_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    lines += ["| stage | seconds | peak RSS GiB |", "|---|---|---|"]
    lines += [f"| {n} | {s:.1f} | {m:.2f} |" for n, s, m in st.rows]
    for label, rows, projection, agree, rel, size, onnx_bytes, bits, phases in results:
        lines += ["", f"### {label}", "", "| stage | seconds | peak RSS GiB |", "|---|---|---|"]
        lines += [f"| {n} | {s:.1f} | {m:.2f} |" for n, s, m in rows]
        total = sum(s for n, s, _ in rows if not n.startswith("captures alone"))  # that row is measurement only
        lines += ["", f"- total {total:.0f} s; lowered vs fake-quantized on 16 held-out images: same top-1 on "
                      f"{agree:.0f} %, logits relative error {rel:.1e}",
                  f"- model file {size / 2**20:.1f} MiB (FP32 parameters {fp_mb:.1f} MiB), ONNX "
                  f"{onnx_bytes / 2**20:.1f} MiB; quantized linears {bits:.2f} bits per weight all-in"]
        lines.append(f"- {phases}")
        if projection:
            lines.append(f"- optimization: {projection}")
    return lines + [""]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vmambav2v_tiny"])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--out", default="bench/results/real_workload.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vmq_real_"))
    folder = work / "calib"
    make_photo_folder(folder, args.calib)
    lines = ["# The real workload: 224x224 checkpoints and a folder of photographs", "",
             f"Machine: {machine_line()}. Command: `python bench/real_workload.py {shlex.join(sys.argv[1:])}`. "
             f"{args.note}", "",
             f"Calibration: {args.calib} JPEGs cut from the foolbox wheel's 20 ImageNet photos (random crops and flips, "
             "seed 0), read with the model's preprocessing. Optimization schedules reduced to "
             f"{REDUCED_STEPS} steps x {REDUCED_BATCH} images per block (the projection to the papers' "
             "schedules is given). Random weights: the times, memory and sizes are those of the real shapes; the "
             "accuracy is not measured here.", ""]
    for name in args.models:
        lines += bench_model(name, args, folder, work)
        Path(args.out).write_text("\n".join(lines) + "\n")  # after every model: a partial run keeps what it measured
    print("\n".join(lines))


if __name__ == "__main__":
    main()
