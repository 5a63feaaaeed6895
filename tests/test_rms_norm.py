"""vmq::rms_norm and vmq::add_rms_norm (vmq_fx.ops.rms_norm) against a float64 RMSNorm written here, on the pure-torch
implementation and the C++ kernel of every CPU class; the lowering pass that puts them in place of the decomposed
operators and the residual add (vmq_fx.pt2e.lowering.rms_norm); their ONNX translations (standard ops and
vmq.RmsNorm / vmq.AddRmsNorm) in onnxruntime."""
import copy
from collections import Counter

import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.models import RMSNorm
from vmq_fx.ops.rms_norm import add_rms_norm, rms_norm
from vmq_fx.pt2e.lowering.rms_norm import fuse_rms_norms

aten, vmq = torch.ops.aten, torch.ops.vmq
# A float32 result is within a few ulps of the float64 norm (a sum of up to 1000 rounded squares, one square root, two
# products); a wrong mean (sum / (d - 1)), a missing eps or a weight on the wrong axis is off by far more.
TOL = {torch.float64: 1e-13, torch.float32: 6e-7}
# last axes below, at and above the vector widths and the 16 partial sums, and Vim-T's 192
SIZES = [1, 3, 8, 15, 16, 17, 40, 96, 192, 1000]


def _float64_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), w.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", SIZES)
def test_norm_is_rmsnorm_in_float64(d, dtype, implementation):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 7, d, dtype=torch.float64, generator=g) * torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None]
    w = torch.rand(d, dtype=torch.float64, generator=g) + 0.5
    out = rms_norm(x.to(dtype), w.to(dtype), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert _max_rel(out, _float64_norm(x.to(dtype), w.to(dtype), 1e-5)) < TOL[dtype]


def test_eps_zero_rows_and_strides(implementation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 48, 5, generator=g).transpose(1, 2)  # not contiguous
    w = torch.rand(48, generator=g)
    assert _max_rel(rms_norm(x, w, 1e-5), _float64_norm(x, w, 1e-5)) < TOL[torch.float32]
    zeros = rms_norm(torch.zeros(2, 48), w, 1e-5)
    assert torch.equal(zeros, torch.zeros(2, 48))
    tiny = torch.full((1, 48), 1e-4)  # mean(x^2) = 1e-8, far below eps: eps decides the scale
    assert _max_rel(rms_norm(tiny, w, 1e-2), _float64_norm(tiny, w, 1e-2)) < TOL[torch.float32]
    assert rms_norm(torch.empty(0, 48), w, 1e-5).shape == (0, 48)


def test_every_build_sums_in_the_same_order():
    """Sixteen partial sums whatever the vector width: the avx512, avx2 and generic builds give the same bits."""
    from vmq_fx.ops import native

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(33, 197, generator=g) * 3, torch.rand(197, generator=g)
    outs = {}
    for isa in native.executable_isas():
        with native.use_isa(isa):
            outs[isa] = [rms_norm(x[:, :d].contiguous(), w[:d], 1e-5) for d in (5, 16, 40, 192, 197)]
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(out, first)), isa


def test_add_rms_norm_is_the_sum_and_its_norm(implementation):
    """The sum is x + residual's float sum (aten.add's bits) and the norm is rms_norm's of it, bit for bit, whatever
    the build; both against float64."""
    g = torch.Generator().manual_seed(2)
    for d in (3, 17, 192):
        x, r, w = torch.randn(4, 9, d, generator=g), torch.randn(4, 9, d, generator=g), torch.rand(d, generator=g) + 0.5
        out, total = add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(total, x + r) and torch.equal(out, rms_norm(x + r, w, 1e-5))
        assert _max_rel(out, _float64_norm(x.double() + r.double(), w, 1e-5)) < TOL[torch.float32]
    xd = torch.randn(2, 5, 24, dtype=torch.float64, generator=g)
    out, total = add_rms_norm(xd, -xd.flip(0), w[:24].double(), 1e-5)
    assert _max_rel(out, _float64_norm(xd - xd.flip(0), w[:24].double(), 1e-5)) < TOL[torch.float64]


def test_backward_is_the_reference_gradient(implementation):
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(24, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-3), (x, w))
    r = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b, c: add_rms_norm(a, b, c, 1e-3), (x, r, w))  # both outputs' gradients


class _Block(torch.nn.Module):
    """The model's RMSNorm and a linear: a Vim block's front (the residual add is its user's)."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = RMSNorm(d)
        self.proj = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)


def _graph(module, *args) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


class _TwoBlocks(torch.nn.Module):
    """Two pre-norm blocks: the residual stream goes on past the first norm (the sum has a reader besides it)."""

    def __init__(self, d=32):
        super().__init__()
        self.first, self.second = _Block(d), _Block(d)

    def forward(self, x, residual):
        residual = x + residual
        hidden = self.first.proj(self.first.norm(residual))
        return self.second.proj(self.second.norm(hidden + residual))


def test_the_decomposed_norm_and_its_residual_add_become_one_node():
    torch.manual_seed(0)
    x, r = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    module = _TwoBlocks().eval()
    gm = _graph(module, x, r)
    assert _targets(gm)[aten.rsqrt.default] == 2
    assert fuse_rms_norms(gm) == 2
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    t = _targets(gm)
    assert t[vmq.add_rms_norm.default] == 2 and vmq.rms_norm.default not in t
    assert not {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default, aten.mul.Tensor, aten.add.Tensor} & set(t)
    b1, b2 = module.first, module.second
    s1 = x.double() + r.double()
    h1 = _float64_norm(s1, b1.norm.weight.detach(), b1.norm.eps) @ b1.proj.weight.double().T + b1.proj.bias.double()
    ref = _float64_norm(h1 + s1, b2.norm.weight.detach(), b2.norm.eps) @ b2.proj.weight.double().T
    ref = ref + b2.proj.bias.double()
    # float32 linears of 32 terms around the norms: ~1e-7 of the outputs' size (an output near 0 has no relative bound)
    assert ((gm(x, r).double() - ref).norm() / ref.norm()).item() < 1e-5


def test_a_norm_after_a_broadcasting_add_keeps_the_add():
    """x + a [1, L, d] embedding (Vim's first block): the add is not fused, the norm is."""
    class Embedded(_Block):
        def forward(self, x, pos):
            return self.proj(self.norm(x + pos))

    gm = _graph(Embedded().eval(), torch.randn(2, 9, 32), torch.randn(1, 9, 32))
    assert fuse_rms_norms(gm) == 1
    gm.graph.eliminate_dead_code()
    t = _targets(gm)
    assert t[vmq.rms_norm.default] == 1 and t[aten.add.Tensor] == 1 and vmq.add_rms_norm.default not in t


class _SharedRsqrt(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d))

    def forward(self, x):
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return x * inv * self.weight, inv  # the reciprocal root has a reader of its own


class _OtherAxis(torch.nn.Module):
    def __init__(self, d=9):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5) * self.weight


@pytest.mark.parametrize("module", [_SharedRsqrt(), _OtherAxis()], ids=["shared rsqrt", "other axis"])
def test_a_norm_that_is_not_the_pattern_stays(module):
    gm = _graph(module, torch.randn(2, 9, 32))
    before = _targets(gm)
    assert fuse_rms_norms(gm) == 0
    assert _targets(gm) == before


def _lowered_both_ways(gm):
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.smoothquant_pts(8, 8)))
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    quantized = convert_pt2e(prepared)
    return vmq_fx.lower(copy.deepcopy(quantized)), vmq_fx.lower(copy.deepcopy(quantized), fuse_norms=False)


def test_lowering_fuses_every_norm_of_a_quantized_vim(vim):
    torch.manual_seed(0)
    model, gm = vim
    norms = sum(isinstance(m, RMSNorm) for m in model.modules())
    fused, separate = _lowered_both_ways(gm)
    t, t_separate = _targets(fused), _targets(separate)
    assert t[vmq.rms_norm.default] + t[vmq.add_rms_norm.default] == norms and aten.rsqrt.default not in t
    # every norm but the first (after the embeddings) follows a residual add
    assert t[vmq.add_rms_norm.default] == norms - 1
    assert t_separate[aten.add.Tensor] - t[aten.add.Tensor] == (norms - 1) + norms  # the residual adds, each + eps
    assert t_separate[aten.rsqrt.default] == norms
    assert not {vmq.rms_norm.default, vmq.add_rms_norm.default} & set(t_separate)
    x = torch.randn(8, 1, 28, 28)
    out, ref = fused(x), separate(x)
    # the sum of squares in another order: an ulp in a normalized value, now and then a rounding level downstream
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_lowering_leaves_layer_norms_alone(vmamba):
    """VMamba normalizes with LayerNorm: nothing to fuse, the same graph and bits either way."""
    fused, separate = _lowered_both_ways(vmamba[1])
    assert not {vmq.rms_norm.default, vmq.add_rms_norm.default} & set(_targets(fused))
    assert _targets(fused) == _targets(separate)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(fused(x), separate(x))


class _Norm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.register_buffer("weight", torch.rand(d) + 0.5)

    def forward(self, x):
        return torch.ops.vmq.rms_norm(x, self.weight, 1e-5)


class _AddNorm(_Norm):
    def forward(self, x):
        out, total = torch.ops.vmq.add_rms_norm(x, x.flip(1), self.weight, 1e-5)
        return out, total * 2


@pytest.mark.parametrize("ops", ["onnx", "vmq"])
@pytest.mark.parametrize("d", [192, 17, 1])
def test_onnx_translations_match_float64(d, ops, tmp_path, request):
    from vmq_fx.export import ort_session

    if ops == "vmq":
        request.getfixturevalue("ort_custom_ops")
    x = torch.randn(3, 7, d, generator=torch.Generator().manual_seed(d))
    module = _Norm(d)
    res = vmq_fx.export_onnx(module, x, tmp_path / "n.onnx", ops=ops)
    if ops == "vmq":
        assert res.op_counts == {"RmsNorm": 1}
    else:
        assert "RmsNorm" not in res.op_counts and res.op_counts["ReduceMean"] == 1
    sess = ort_session(res.path)
    for batch in (x, x[:1]):  # the batch stays dynamic
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0])
        assert _max_rel(out, _float64_norm(batch, module.weight, 1e-5)) < TOL[torch.float32]
        if ops == "vmq":  # the torch op's own core: the same bits
            assert torch.equal(out, module(batch))


@pytest.mark.parametrize("ops", ["onnx", "vmq"])
def test_onnx_translations_of_the_residual_add_match_float64(ops, tmp_path, request):
    from vmq_fx.export import ort_session

    if ops == "vmq":
        request.getfixturevalue("ort_custom_ops")
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(5))
    module = _AddNorm(40)
    res = vmq_fx.export_onnx(module, x, tmp_path / "n.onnx", ops=ops)
    assert ("AddRmsNorm" in res.op_counts) == (ops == "vmq")
    sess = ort_session(res.path)
    out, doubled = (torch.from_numpy(a) for a in sess.run(None, {sess.get_inputs()[0].name: x.numpy()}))
    total = x + x.flip(1)
    assert torch.equal(doubled, total * 2)
    assert _max_rel(out, _float64_norm(total, module.weight, 1e-5)) < TOL[torch.float32]
    if ops == "vmq":
        assert torch.equal(out, module(x)[0])
