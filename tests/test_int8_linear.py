import pytest
import torch

from vmq_fx.ops import int8_linear, int8_linear_reference, pack_int4, unpack_int4


def _case(b, length, k, n, w_bits, a_bits=8, smooth=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, k, generator=g) * 3
    qmax_w = 2 ** (w_bits - 1) - 1
    w = torch.randint(-qmax_w - 1, qmax_w + 1, (n, k), generator=g, dtype=torch.int8)
    a_qmax = 2**a_bits - 1
    args = (
        x,
        torch.rand(k, generator=g) + 0.5 if smooth else None,  # smoothing scales
        torch.rand(length, generator=g) * 0.05 + 0.01,
        torch.randint(0, a_qmax + 1, (length,), generator=g, dtype=torch.int32),
        pack_int4(w) if w_bits <= 4 else w,
        torch.rand(n, generator=g) * 0.01 + 1e-3,
        torch.randn(n, generator=g) if bias else None,
        0,
        a_qmax,
        w_bits,
    )
    return args


@pytest.mark.parametrize("shape", [(2, 17, 96, 40), (1, 5, 7, 3), (3, 50, 33, 65), (4, 1, 16, 16)])
@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 8), (6, 6), (4, 4)])
def test_int8_linear_matches_float64_dequantize_then_matmul(shape, w_bits, a_bits):
    args = _case(*shape, w_bits=w_bits, a_bits=a_bits)
    out = int8_linear(*args)
    ref = int8_linear_reference(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # Integer accumulation is exact; only the float rescale rounds.
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_int8_linear_uses_an_integer_matmul():
    args = _case(2, 17, 96, 40, w_bits=8)
    with torch.profiler.profile() as prof:
        int8_linear(*args)
    names = {e.key for e in prof.key_averages()}
    assert "aten::_int_mm" in names


@pytest.mark.parametrize("k", [8, 7, 1])
def test_int4_pack_round_trip(k):
    w = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), w)


def test_int8_linear_opcheck_and_shape_errors():
    args = _case(2, 17, 16, 8, w_bits=8)
    torch.library.opcheck(torch.ops.vmq.int8_linear.default, args)
    bad = list(args)
    bad[2] = torch.ones(5)
    with pytest.raises(ValueError, match="act_scale"):
        int8_linear(*bad)
