"""What the shipped models' activations look like at the inputs of the quantized linears: per-channel and per-token
ranges, the phenomena the Vim quantization papers target (outlier channels, a class-token spike, outliers that move
between images), measured on our models.

    python bench/activation_ranges.py [--models vim-fm-197 vmamba-fm-tiny] [--images 256] [--seed 0]
        [--out bench/results/activation_ranges.md]

For every quantized linear (the same ones VisualMambaQuantizer picks: the mixers' projections and VMamba's MLPs) the
input |x| over the calibration images gives
* channel max / median: the largest per-channel max|x| over the median channel's (an outlier channel: >> 1);
* token max / median: the same over token positions (a token spike; the class token's position is named for Vim);
* top-channel stability: the share of images whose own largest channel is among the calibration set's 4 largest
  (OuroMamba's "outliers move over time" would make it low; high means static channel choices hold).
Plots (PNG beside the report): per-channel max|x| / median of every in_proj and out_proj, sorted; per-token max|x| of
one middle block's projections over token positions.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_line  # noqa: E402

import vmq_fx  # noqa: E402
from vmq_fx.app.data import calibration_images  # noqa: E402
from vmq_fx.models import load_reference  # noqa: E402
from vmq_fx.pt2e.quantizer import find_quantizable_linears  # noqa: E402

TOP = 4  # channels counted as "the largest" in the stability measure


def quantized_linear_names(model, images) -> list[str]:
    gm = vmq_fx.export_model(model, images[:2]).module()
    return [layer.name for _, layer in find_quantizable_linears(gm)]


@torch.no_grad()
def record_inputs(model, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """|x| of each named linear's input, as [images, tokens, channels] (VMamba's [B, H, W, C] flattened)."""
    seen, hooks = {}, []
    for name in names:
        def hook(mod, args, out, name=name):
            a = args[0].detach().abs().float()
            seen[name] = a.flatten(1, -2) if a.dim() > 3 else a
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    model(images)
    for h in hooks:
        h.remove()
    return seen


def summarize(a: torch.Tensor) -> dict:
    channel = a.amax((0, 1))
    token = a.amax((0, 2))
    top = set(channel.topk(min(TOP, channel.numel())).indices.tolist())
    per_image = a.amax(1).argmax(-1)  # each image's own largest channel
    return {"channel_ratio": float(channel.max() / channel.median()), "channel_median": float(channel.median()),
            "channel_max": float(channel.max()), "token_ratio": float(token.max() / token.median()),
            "token_argmax": int(token.argmax()), "tokens": a.shape[1],
            "stable": 100.0 * sum(int(c) in top for c in per_image.tolist()) / len(per_image),
            "channel": channel, "token": token}


def plot(model_name: str, stats: dict[str, dict], out_dir: Path, cls_pos: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_{model_name}.png", dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, role in zip(axes, ("in_proj", "out_proj")):
        for name, s in stats.items():
            if name.endswith(role):
                c = s["channel"]
                ax.plot((c / c.median()).sort(descending=True).values.numpy(), label=name.rsplit(".", 2)[0], lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{model_name}: {role} input, per-channel max|x| / median")
        ax.set_xlabel("channels, largest first")
        ax.legend(fontsize=6)
    save(fig, "activation_channels")

    blocks = sorted({name.rsplit(".", 2)[0] for name in stats if name.endswith("in_proj")})
    middle = blocks[len(blocks) // 2]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, s in stats.items():
        if name.startswith(middle + ".") and s["tokens"] > 1:
            ax.plot(s["token"].numpy() / s["token"].median().item(), label=name[len(middle) + 1:], lw=1)
    if cls_pos is not None:
        ax.axvline(cls_pos, color="k", ls=":", lw=1, label=f"class token ({cls_pos})")
    ax.set_title(f"{model_name}, {middle}: per-token max|x| / median over token positions")
    ax.set_xlabel("token position")
    ax.legend(fontsize=6)
    save(fig, "activation_tokens")


def class_token_position(model) -> int | None:
    return getattr(model, "token_position", None) if getattr(model, "cls_token", None) is not None else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["vim-fm-197", "vmamba-fm-tiny"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/activation_ranges.md")
    args = p.parse_args()
    out = Path(args.out)
    images = calibration_images(args.images, seed=args.seed)
    lines = ["# Activation ranges at the quantized linears' inputs", "",
             f"Machine: {machine_line()}. Command: `python bench/activation_ranges.py {shlex.join(sys.argv[1:])}`.", "",
             f"{args.images} Fashion-MNIST training images (seed {args.seed}), FP32 models. Channel max / median: the "
             "largest per-channel max|x| over the median channel's; token max / median: the same over token "
             f"positions (argmax: the position of the largest); stable %: images whose own largest channel is among "
             f"the {TOP} largest channels of all {args.images} images.", ""]
    for name in args.models:
        model = load_reference(name)
        names = quantized_linear_names(model, images)
        stats = {n: summarize(a) for n, a in record_inputs(model, names, images).items()}
        cls_pos = class_token_position(model)
        lines += [f"## {name}" + (f" (class token at position {cls_pos})" if cls_pos is not None else ""), "",
                  "| linear | channel max / median | max, median | token max / median | token argmax | stable % |",
                  "|---|---|---|---|---|---|"]
        for n, s in stats.items():
            lines.append(f"| {n} | {s['channel_ratio']:.1f} | {s['channel_max']:.1f}, {s['channel_median']:.2f} "
                         f"| {s['token_ratio']:.2f} | {s['token_argmax']} / {s['tokens']} | {s['stable']:.0f} |")
        by_role: dict[str, list[dict]] = {}
        for n, s in stats.items():
            role = n.rsplit(".", 1)[-1]
            role = n.rsplit(".", 2)[-2] if role.isdigit() else role.removesuffix("_b")
            by_role.setdefault(role, []).append(s)
        lines += ["", "By role (median over layers): " + "; ".join(
            f"{role} channel {torch.tensor([s['channel_ratio'] for s in ss]).median():.1f}x, token "
            f"{torch.tensor([s['token_ratio'] for s in ss]).median():.2f}x, stable "
            f"{torch.tensor([s['stable'] for s in ss]).median():.0f} %" for role, ss in by_role.items()) + ".", ""]
        if cls_pos is not None:
            at_cls = sum(s["token_argmax"] == cls_pos for s in stats.values())
            lines += [f"Class token: the largest token of {at_cls} of {len(stats)} linears' inputs.", ""]
        lines += [f"![channels](activation_channels_{name}.png) ![tokens](activation_tokens_{name}.png)", ""]
        plot(name, stats, out.parent, cls_pos)
        print(f"{name}: {len(stats)} linears", flush=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
