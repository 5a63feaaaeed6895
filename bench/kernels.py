"""Triton kernels vs cuBLAS fp16 / pure torch on a GPU: correctness first, then medians of triton.testing.do_bench.

    python bench/kernels.py [--out bench/results/kernels_<gpu>.md]
    TRITON_INTERPRET=1 python bench/kernels.py --smoke     # tiny shapes on CPU: checks the script runs, no timings

* int8 linear (W8A8) and W4A8 linear vs torch.matmul in fp16 (the speed-up) and bf16, and vs PyTorch's own int8
  GEMM (``torch._int_mm``, int32 out, no quantize or rescale) where its shape rules allow, at M = batch x 197 (batch
  1, 64, 256) and the (K, N) of in_proj / x_proj / dt_proj / out_proj of Vim-T, Vim-S and Vim-B: TOPS and the
  speed-up.
* VQ linear at 2 and 3 bits vs fp16 at batch 1, 8 and 256 of 197 tokens: achieved weight bandwidth.
* selective scan forward vs the pure-torch implementation of the op at Vim-T / Vim-B shapes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmq_fx.ops.triton.int8_linear import int8_linear_triton  # noqa: E402
from vmq_fx.ops.triton.selective_scan import selective_scan_triton  # noqa: E402
from vmq_fx.ops.triton.vq_linear import vq_linear_triton  # noqa: E402
from vmq_fx.ops import pack_codes, pack_int4, unpack_int4  # noqa: E402
from vmq_fx.ops.selective_scan import _forward as scan_torch  # noqa: E402
from vmq_fx.ops.vq_linear import code_bits  # noqa: E402

# (name, d_model): Vim-T 192, Vim-S 384, Vim-B 768; d_inner = 2 d_model, dt_rank = d_model / 16, d_state 16
VIMS = [("Vim-T", 192), ("Vim-S", 384), ("Vim-B", 768)]


def _layers(dm: int):
    di, r = 2 * dm, dm // 16
    return [("in_proj", dm, 2 * di), ("x_proj", di, r + 32), ("dt_proj", r, di), ("out_proj", di, dm)]


def _time(fn, smoke: bool) -> float:
    if smoke:
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median") * 1e-3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter; no timings")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a GPU (or --smoke with TRITON_INTERPRET=1)")
    gpu = "interpreter" if args.smoke else torch.cuda.get_device_name()
    batches = [1] if args.smoke else [1, 8, 64, 256]  # int8: 1, 64, 256; VQ: 1, 8, 256
    tokens = 5 if args.smoke else 197
    vims = VIMS[:1] if args.smoke else VIMS
    import triton

    versions = f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}"
    rows = [f"# Triton kernels on {gpu}", "", f"{versions}. Command: `python bench/kernels.py {' '.join(sys.argv[1:])}`. "
            "Medians of triton.testing.do_bench; speed-up = fp16 cuBLAS time / kernel time; correctness checked "
            "against the op's reference first.", "",
            "| kernel | model | layer | M | K | N | kernel ms | fp16 ms | speed-up | TOPS or GB/s | bf16 ms | "
            "torch._int_mm ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def emit(row: str) -> None:  # each row as it comes, so that a run cut short keeps what it measured
        rows.append(row)
        print(row, flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(rows) + "\n")

    g = torch.Generator().manual_seed(0)
    for vim, dm in vims:
        for layer, k, n in _layers(dm if not args.smoke else 32):
            for b in batches:
                m = b * tokens
                x = torch.randn(b, tokens, k, generator=g).to(dev)
                w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(dev)
                w4 = pack_int4(torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)).to(dev)
                common = (torch.full((tokens,), 0.02, device=dev), torch.full((tokens,), 128, dtype=torch.int32,
                                                                               device=dev))
                wscale = torch.full((n,), 1e-3, device=dev)
                xh, wh = x.half(), torch.randn(n, k, generator=g).half().to(dev)
                t16 = _time(lambda xh=xh, wh=wh: xh @ wh.t(), args.smoke)
                xb, wb = xh.bfloat16(), wh.bfloat16()
                t_bf16 = _time(lambda xb=xb, wb=wb: xb @ wb.t(), args.smoke)
                # torch._int_mm on CUDA: M > 16, K and N multiples of 8
                t_int_mm = (_time(lambda a=x.reshape(m, k).to(torch.int8), b=w8.t(): torch._int_mm(a, b), args.smoke)
                            if not args.smoke and m > 16 and k % 8 == 0 and n % 8 == 0 else float("nan"))
                more = f" | {t_bf16 * 1e3:.3f} | " + ("-" if math.isnan(t_int_mm) else f"{t_int_mm * 1e3:.3f}") + " |"
                for name, w, bits in (() if b == 8 else (("int8 W8A8", w8, 8), ("int8 W4A8", w4, 4))):
                    w_sum = (unpack_int4(w, k) if bits <= 4 else w).int().sum(1, dtype=torch.int32)
                    call = (x, None, *common, w, wscale, w_sum, None, 0, 255, bits)
                    ref = torch.ops.vmq.int8_linear(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in call])
                    torch.testing.assert_close(int8_linear_triton(*call).cpu(), ref, rtol=1e-4, atol=1e-3)
                    t = _time(lambda call=call: int8_linear_triton(*call), args.smoke)
                    emit(f"| {name} | {vim} | {layer} | {m} | {k} | {n} | {t * 1e3:.3f} | {t16 * 1e3:.3f} | "
                         f"{t16 / t:.2f}x | {2 * m * n * k / t / 1e12:.1f} TOPS" + more)
                for vq_bits, (d, kk) in ((2, (4, 256)), (3, (2, 64))):
                    if b == 64:
                        continue
                    codes = pack_codes(torch.randint(0, kk, (n, -(-k // d)), generator=g), code_bits(kk)).to(dev)
                    cb, rs = torch.randn(kk, d, generator=g).half().to(dev), torch.full((n,), 192, dtype=torch.uint8).to(dev)
                    ref = torch.ops.vmq.vq_linear(x.cpu(), codes.cpu(), cb.cpu(), rs.cpu(), None, k)
                    torch.testing.assert_close(vq_linear_triton(x, codes, cb, rs, None, k).cpu(), ref, rtol=1e-3,
                                               atol=1e-3)
                    t = _time(lambda x=x, c=codes, cb=cb, rs=rs, k=k: vq_linear_triton(x, c, cb, rs, None, k),
                              args.smoke)
                    gbs = (codes.numel() + cb.numel() * 2) / t / 1e9
                    emit(f"| VQ {vq_bits}-bit | {vim} | {layer} | {m} | {k} | {n} | {t * 1e3:.3f} | "
                         f"{t16 * 1e3:.3f} | {t16 / t:.2f}x | {gbs:.0f} GB/s (codes)" + more)
    for vim, dm in (VIMS[:1] if args.smoke else [VIMS[0], VIMS[2]]):
        di, length = (16, 5) if args.smoke else (2 * dm, 197)
        u, delta = torch.randn(8, di, length, generator=g), torch.randn(8, di, length, generator=g) * 0.5
        A, B, C = -torch.rand(di, 16, generator=g), torch.randn(8, 16, length, generator=g), torch.randn(
            8, 16, length, generator=g)
        D, z, bias = torch.randn(di, generator=g), torch.randn(8, di, length, generator=g), torch.randn(di, generator=g)
        call = [t.to(dev) for t in (u, delta, A, B, C, D, z, bias)] + [True]
        ref = torch.ops.vmq.selective_scan(u, delta, A, B, C, D, z, bias, True)
        out = selective_scan_triton(*call)
        torch.testing.assert_close(out[0].cpu(), ref[0], rtol=1e-4, atol=1e-4)
        t = _time(lambda call=call: selective_scan_triton(*call), args.smoke)
        t_ref = _time(lambda call=call: scan_torch(*call), args.smoke)
        emit(f"| selective scan fwd | {vim} | batch 8, L {length}, d_inner {di}, N 16 | - | - | - | "
             f"{t * 1e3:.3f} | {t_ref * 1e3:.3f} (pure torch) | {t_ref / t:.2f}x | - | - | - |")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and "--smoke" in sys.argv:
        sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment")
    main()
