"""vmq::hadamard_transform (vmq_fx.ops.hadamard): the pure-torch implementation and the C++ kernel of every CPU class
against a float64 product with a Walsh-Hadamard matrix built here from its closed form, its backward, and its ONNX
translations (standard ops and vmq.HadamardTransform) in onnxruntime."""
from collections import Counter

import pytest
import torch

import vmq_fx
from vmq_fx.ops.hadamard import hadamard_transform, walsh_hadamard

# float64 / float32 rounding of sums of up to 1024 terms; a wrong sign, order or normalization is off by O(1)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
# (d, m): sizes below, at and above the SIMD width (4, 8, 16 floats), Vim-T's (192 = 3 x 64, 384 = 3 x 128, the
# dt_proj's 12 = 3 x 4), an odd factor of 5, a size of one
SIZES = [(1, 1), (2, 1), (8, 1), (16, 1), (64, 1), (1024, 1), (3, 3), (12, 3), (96, 3), (192, 3), (384, 3), (40, 5)]


def closed_form_hadamard(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(n), written independently of the op's Sylvester recursion."""
    i = torch.arange(n)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / n ** 0.5


def _orthogonal(m: int, seed: int) -> torch.Tensor | None:
    if m == 1:
        return None
    q, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.contiguous()


def _reference(x: torch.Tensor, odd: torch.Tensor | None) -> torch.Tensor:
    m = 1 if odd is None else odd.shape[0]
    odd = torch.ones(1, 1, dtype=torch.float64) if odd is None else odd
    return x.double() @ torch.kron(odd, closed_form_hadamard(x.shape[-1] // m))


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,m", SIZES)
def test_transform_is_the_product_with_kron_odd_h(d, m, dtype, implementation):
    g = torch.Generator().manual_seed(d + m)
    x, odd = torch.randn(3, 7, d, dtype=torch.float64, generator=g), _orthogonal(m, d)
    out = hadamard_transform(x.to(dtype), None if odd is None else odd.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, _reference(x, odd)) < TOL[dtype]


def test_every_build_computes_the_same_butterflies():
    """With m = 1 the kernel is butterflies only (a + c, a - c, then one scaling), in the same order whatever the
    vector width: every build gives the same bits, whether a stage runs inside a register, across registers or in the
    scalar loop."""
    from vmq_fx.ops import native

    x = torch.randn(9, 1024, generator=torch.Generator().manual_seed(7))
    outs = {}
    for isa in native.executable_isas():
        with native.use_isa(isa):
            outs[isa] = [hadamard_transform(x[:, :n].contiguous(), None) for n in (2, 8, 64, 128, 256, 1024)]
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(out, first)), isa


def test_transform_takes_any_leading_shape_strides_and_half_precision(implementation):
    g = torch.Generator().manual_seed(0)
    odd = _orthogonal(3, 1)
    x = torch.randn(5, 96, 4, dtype=torch.float64, generator=g).transpose(1, 2)  # not contiguous
    ref = _reference(x, odd)
    assert _rel(hadamard_transform(x, odd), ref) < TOL[torch.float64]
    assert _rel(hadamard_transform(x[0, 0], odd), ref[0, 0]) < TOL[torch.float64]  # one row
    half = hadamard_transform(x.to(torch.bfloat16), odd.float())
    assert half.dtype == torch.bfloat16 and _rel(half, ref) < 1e-2
    assert hadamard_transform(torch.empty(0, 12), odd.float()).shape == (0, 12)


def test_a_rotation_is_undone_by_its_transpose():
    """kron(odd, H) is orthogonal: transforming with odd, then with odd^T, gives x back (H is symmetric)."""
    x, odd = torch.randn(4, 192, dtype=torch.float64), _orthogonal(3, 2)
    back = hadamard_transform(hadamard_transform(x, odd), odd.T.contiguous())
    assert (back - x).abs().max() < 1e-12


def test_backward_is_the_transposed_transform(implementation):
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    odd = _orthogonal(3, 3)
    torch.autograd.gradcheck(lambda t: hadamard_transform(t, odd), (x,))
    grad = torch.randn(2, 3, 24, dtype=torch.float64)
    (hadamard_transform(x, odd) * grad).sum().backward()
    r = torch.kron(odd, closed_form_hadamard(8))
    assert (x.grad - grad @ r.T).abs().max() < 1e-12


def test_walsh_hadamard_is_sylvester_and_refuses_other_sizes():
    for n in (1, 2, 4, 64):
        assert torch.allclose(walsh_hadamard(n), closed_form_hadamard(n), atol=1e-15, rtol=0)
    walsh_hadamard(4).zero_()  # a copy: the op's own matrix is not handed out
    assert torch.allclose(walsh_hadamard(4), closed_form_hadamard(4), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="power of two, got 12"):
        walsh_hadamard(12)


def test_the_op_traces_as_one_node():
    class Rotate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("odd", _orthogonal(3, 4).float())

        def forward(self, x):
            return torch.ops.vmq.hadamard_transform(x, self.odd) + 1

    ep = torch.export.export(Rotate(), (torch.randn(2, 5, 48),))
    targets = Counter(n.target for n in ep.graph.nodes if n.op == "call_function")
    assert targets[torch.ops.vmq.hadamard_transform.default] == 1


class _Rotate(torch.nn.Module):
    def __init__(self, odd):
        super().__init__()
        self.register_buffer("odd", odd)

    def forward(self, x):
        return torch.ops.vmq.hadamard_transform(x, self.odd)


@pytest.mark.parametrize("ops", ["onnx", "vmq"])
@pytest.mark.parametrize("d,m", [(384, 3), (12, 3), (64, 1), (2, 1), (40, 5)])
def test_onnx_translations_match_float64(d, m, ops, tmp_path, request):
    from vmq_fx.export import ort_session

    if ops == "vmq":
        request.getfixturevalue("ort_custom_ops")
    odd = _orthogonal(m, d)
    x = torch.randn(3, 7, d, generator=torch.Generator().manual_seed(d))
    module = _Rotate(None if odd is None else odd.float())
    res = vmq_fx.export_onnx(module, x, tmp_path / "h.onnx", ops=ops)
    if ops == "vmq":
        assert res.op_counts == {"HadamardTransform": 1}
    else:
        assert "HadamardTransform" not in res.op_counts and res.op_counts.get("MatMul", 0) <= 3
    sess = ort_session(res.path)
    for batch in (x, x[:1]):  # the batch stays dynamic
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0])
        assert _rel(out, _reference(batch, odd)) < TOL[torch.float32]
        if ops == "vmq" and m == 1:  # the torch op's own core: the same bits
            assert torch.equal(out, hadamard_transform(batch, None))
