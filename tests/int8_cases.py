"""Random arguments of vmq::int8_linear shared by the op and kernel tests (not a test module)."""
import torch

from vmq_fx.ops.int8_linear import pack_int4, prepare_weight


def int8_case(b, length, k, n, w_bits, a_bits=8, smooth=True, bias=True, seed=0, packed=None, dynamic=False):
    """(op arguments, reference arguments): the reference gets the plain integer weight; the op's weight is packed
    two per byte for 4-bit weights unless ``packed=False`` (the stored form; the lowering's is int8). ``dynamic``:
    no activation scales or zero points (per-token dynamic)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, k, generator=g) * 3
    qmax_w = 2 ** (w_bits - 1) - 1
    w_int = torch.randint(-qmax_w - 1, qmax_w + 1, (n, k), generator=g, dtype=torch.int8)
    a_qmax = 2**a_bits - 1
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    act_scale = torch.rand(length, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, a_qmax + 1, (length,), generator=g, dtype=torch.int32)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    beta = torch.randn(n, generator=g) if bias else None
    w_stored, w_sum = prepare_weight(w_int)
    if (w_bits <= 4) if packed is None else packed:
        w_stored = pack_int4(w_stored)
    if dynamic:
        act_scale = zp = None
    op_args = (x, s, act_scale, zp, w_stored, w_scale, w_sum, beta, 0, a_qmax, w_bits)
    ref_args = (x, s, act_scale, zp, w_int, w_scale, beta, 0, a_qmax)
    return op_args, ref_args
