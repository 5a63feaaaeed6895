"""vmq::selective_scan's ``add`` input (the output plus another tensor, written in the scan's output pass) and the
lowering pass that hands Vim's later scan the earlier one's output (fuse_scan_sums)."""
import copy
from collections import Counter

import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.ops import native
from vmq_fx.pt2e.lowering.scan_sum import fuse_scan_sums

vmq, aten = torch.ops.vmq, torch.ops.aten


def _inputs(dim, dtype=torch.float32, batch=2, length=11, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, delta, z = rand(batch, dim, length), rand(batch, dim, length), rand(batch, dim, length)
    A = -torch.rand(dim, n, generator=g, dtype=dtype) * 3
    B, C = rand(batch, n, length), rand(batch, n, length)
    return u, delta, A, B, C, rand(dim), z, rand(dim)


@pytest.mark.parametrize("dim", [20, 32, 40])  # partial register blocks, whole ones, both
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["sequence_major", "channels_first"])
def test_add_gives_the_bits_of_the_output_plus_add(implementation, dim, reverse, dtype, layout):
    args = _inputs(dim, dtype)
    g = torch.Generator().manual_seed(1)
    add = torch.randn(2, 11, dim, generator=g, dtype=dtype).transpose(1, 2)  # another scan's output, as Vim's
    if layout == "channels_first":
        add = add.contiguous()
    out, last = vmq.selective_scan(*args, True, reverse)
    fused, fused_last = vmq.selective_scan(*args, True, reverse, add)
    assert torch.equal(fused, out + add) and torch.equal(fused_last, last)
    assert fused.stride() == out.stride()  # sequence-major, as without add


def test_add_in_another_dtype_is_torchs_add(implementation):
    args = _inputs(20)
    add = torch.randn(2, 20, 11, dtype=torch.float64)
    out, _ = vmq.selective_scan(*args, True, False)
    fused, _ = vmq.selective_scan(*args, True, False, add)
    assert fused.dtype == torch.float32 and torch.equal(fused, out.add_(add))


def test_add_of_the_wrong_shape_is_one_clear_error(implementation):
    args = _inputs(20)
    with pytest.raises(ValueError, match=r"^vmq.selective_scan: add must have u's shape \[2, 20, 11\], got \[2, 11, 20\]$"):
        vmq.selective_scan(*args, True, False, torch.zeros(2, 11, 20))


@pytest.mark.parametrize("reverse", [False, True])
def test_gradient_of_add_is_the_outputs(implementation, reverse):
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in _inputs(20, torch.float64, length=6))
    add = torch.randn(2, 20, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: vmq.selective_scan(*a, True, reverse, add)[0],
                                    (u, delta, A, B, C, D, z, bias))
    assert torch.autograd.gradcheck(lambda a: vmq.selective_scan(u, delta, A, B, C, D, z, bias, True, reverse, a)[0],
                                    (add,))


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _quantized(gm):
    """convert_pt2e of the W8A8 (SmoothQuant + PTS) prepared graph, calibrated on random images."""
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.smoothquant_pts(8, 8)))
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    return convert_pt2e(prepared)


def test_lowering_adds_each_blocks_two_directions_in_the_later_scan(vim):
    torch.manual_seed(0)
    model, gm = vim
    quantized = _quantized(gm)
    fused, separate = vmq_fx.lower(copy.deepcopy(quantized)), vmq_fx.lower(quantized, fuse_scan_sum=False)
    blocks = len(model.layers)
    t, t_separate = _targets(fused), _targets(separate)
    scans = [n for n in fused.graph.nodes if n.target is vmq.selective_scan.default]
    with_add = [n for n in scans if len(n.args) > 10 and n.args[10] is not None]
    assert len(scans) == 2 * blocks and len(with_add) == blocks
    # each block's backward-direction scan adds its forward one's output (the earlier node of the two)
    assert all(n.args[9] is True and n.args[10].args[0] in scans for n in with_add)
    assert t_separate[aten.add.Tensor] - t[aten.add.Tensor] == blocks
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fused(x), separate(x))
    assert fuse_scan_sums(fused) == 0  # nothing left to fuse


class _SharedOutput(torch.nn.Module):
    """Two scans added, where one output has another reader: the add stays."""

    def forward(self, u, delta, A, B, C):
        y0 = vmq.selective_scan(u, delta, A, B, C, None, None, None, True)[0]
        y1 = vmq.selective_scan(u, delta, A, B, C, None, None, None, True, True)[0]
        return y0 + y1, y0 * 2


def test_an_output_with_another_reader_keeps_its_add():
    u, delta, A, B, C = _inputs(20)[:5]
    gm = torch.export.export(_SharedOutput(), (u, delta, A, B, C)).module()
    assert fuse_scan_sums(gm) == 0
    assert _targets(gm)[aten.add.Tensor] == 1


def test_the_fused_kernel_is_the_one_that_adds():
    # The C++ kernel adds in its output pass (not a torch add after it): no aten.add runs on the fused call.
    assert native.kernels() is not None
    args, add = _inputs(32), torch.randn(2, 32, 11)
    with torch.profiler.profile() as prof:
        vmq.selective_scan(*args, True, True, add)
    names = {e.key for e in prof.key_averages()}
    assert "vmq::selective_scan" in names and not {"aten::add", "aten::add_"} & names


def test_onnx_sums_the_sequence_major_rows(vim, tmp_path):
    # The exported file adds the two directions' sequence-major outputs (the scans' own), so that onnxruntime cancels
    # the Transpose after the sum against out_proj's: an Add of the two transposes kept one Transpose per block.
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model, gm = vim
    lowered = vmq_fx.lower(_quantized(gm))
    path = vmq_fx.export_onnx(lowered, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", ops="vmq").path
    graph = onnx.load(str(path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    sums = [n for n in graph.node if n.op_type == "Add" and all(producer.get(i) == "SelectiveScan" for i in n.input)]
    assert len(sums) == len(model.layers)
