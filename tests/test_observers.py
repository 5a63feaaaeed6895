import torch

from vmq_fx.observers import PerChannelWeightFakeQuantize, PerTokenStaticFakeQuantize
from vmq_fx.observers.lp_search import search_asymmetric_ranges, search_symmetric_clips


def _lp_sym_direct(row, clip, qmax, p=2.4):
    scale = clip / qmax
    q = torch.clamp(torch.round(row / scale), -qmax, qmax) * scale
    return (row - q).abs().pow(p).sum()


def test_symmetric_clip_search_matches_brute_force():
    torch.manual_seed(0)
    w = torch.randn(5, 64, dtype=torch.float64)
    w[0, 3] = 12.0  # an outlier makes clipping pay off
    for qmax in (7, 127):
        scales = search_symmetric_clips(w, qmax)
        for r in range(w.shape[0]):
            amax = w[r].abs().max()
            errs = [_lp_sym_direct(w[r], amax * i / 100, qmax) for i in range(1, 101)]
            best = int(torch.stack(errs).argmin()) + 1
            torch.testing.assert_close(scales[r].double(), amax * best / 100 / qmax, rtol=1e-5, atol=0)
    # The outlier row is clipped at 4 bits; a plain max would waste most levels.
    assert search_symmetric_clips(w, 7)[0] < w[0].abs().max() / 7


def test_asymmetric_range_search_matches_brute_force_and_contains_zero():
    torch.manual_seed(1)
    x = torch.cat([torch.rand(3, 500) * 4 + 1, torch.randn(3, 5) * 20], dim=1)  # positive bulk, rare outliers
    lo, hi = x.amin(1), x.amax(1)
    scale, zp = search_asymmetric_ranges(x, lo, hi, levels=16)
    for r in range(3):
        best, best_err = None, float("inf")
        mid, half = (lo[r] + hi[r]) / 2, (hi[r] - lo[r]) / 2
        for i in range(100):
            c_lo, c_hi = mid - half * (1 - i / 100), mid + half * (1 - i / 100)
            s = (c_hi - c_lo) / 15
            z = torch.round(-c_lo / s)
            q = torch.clamp(torch.round(x[r] / s) + z, 0, 15)
            err = (x[r] - (q - z) * s).abs().pow(2.4).sum()
            if err < best_err:
                best, best_err = (c_lo, c_hi), err
        b_lo, b_hi = min(best[0].item(), 0.0), max(best[1].item(), 0.0)
        torch.testing.assert_close(scale[r].item(), (b_hi - b_lo) / 15, rtol=1e-5, atol=1e-7)
        assert 0 <= zp[r] <= 15
        # zero is representable: the level of 0.0 dequantizes to 0 exactly
        assert float((torch.round(torch.tensor(0.0) / scale[r]) + zp[r] - zp[r]) * scale[r]) == 0.0


def test_per_token_statistics_are_pooled_over_images_and_channels():
    fq = PerTokenStaticFakeQuantize(quant_max=255)
    a, b = torch.randn(3, 5, 8), torch.randn(2, 5, 8) * 3
    fq(a)
    fq(b)
    pooled = torch.cat([a, b]).transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(fq.min_val, pooled.amin(1))
    torch.testing.assert_close(fq.max_val, pooled.amax(1))
    torch.testing.assert_close(fq.channel_absmax, torch.cat([a, b]).abs().amax(dim=(0, 1)))
    fq.initialize()
    want_scale, want_zp = search_asymmetric_ranges(pooled, pooled.amin(1), pooled.amax(1), 256)
    torch.testing.assert_close(fq.scale.detach(), want_scale)
    torch.testing.assert_close(fq.zero_point, want_zp.long())
    # Fake quantization: per token, then identical to quantize_per_channel(axis=1) + dequantize.
    x = torch.randn(4, 5, 8)
    ref = torch.ops.quantized_decomposed.dequantize_per_channel(
        torch.ops.quantized_decomposed.quantize_per_channel(x, fq.scale.detach(), fq.zero_point, 1, 0, 255,
                                                            torch.uint8),
        fq.scale.detach(), fq.zero_point, 1, 0, 255, torch.uint8)
    torch.testing.assert_close(fq(x), ref, atol=1e-6, rtol=0)


def test_step_sizes_get_straight_through_gradients():
    fq = PerChannelWeightFakeQuantize(quant_min=-7, quant_max=7)
    w = torch.randn(4, 16)
    fq(w)
    fq.initialize()
    assert fq.scale.requires_grad
    fq(w).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
