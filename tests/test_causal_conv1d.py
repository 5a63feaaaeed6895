"""vmq::causal_conv1d against torch's float64 convolution, its gradients, its graph and its errors."""
import pytest
import torch
import torch.nn.functional as F

from vmq_fx.ops import causal_conv1d_fn, causal_conv1d_op


def conv_reference(x, weight, bias, silu, reverse):
    """F.conv1d in float64 on [batch, C, L], padded K - 1 on both sides and cut to L (Mamba's causal convolution);
    the anti-causal one through flips."""
    x = x.double()
    length, channels = x.shape[1], x.shape[2]
    if reverse:
        x = x.flip(1)
    y = F.conv1d(x.transpose(1, 2), weight.double()[:, None], None if bias is None else bias.double(),
                 padding=weight.shape[1] - 1, groups=channels)[..., :length].transpose(1, 2)
    if reverse:
        y = y.flip(1)
    return F.silu(y) if silu else y


def inputs(channels=20, kernel=4, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 2 * channels, generator=gen)[..., ::2]  # strided, as the chunk of in_proj's output is
    w = torch.randn(channels, kernel, generator=gen)
    b = torch.randn(channels, generator=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("bias,kernel", [(True, 4), (False, 2), (True, 1)])
def test_matches_float64_convolution(implementation, reverse, silu, bias, kernel):
    x, w, b = inputs(kernel=kernel, bias=bias)
    out = causal_conv1d_fn(x, w, b, silu=silu, reverse=reverse)
    ref = conv_reference(x, w, b, silu, reverse)
    assert out.shape == (3, 9, 20) and out.is_contiguous() and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("layout", ["transposed", "every_other_tap"])
def test_weight_read_through_its_strides(implementation, layout):
    # The kernel transposes the taps itself, from the weight's strides: a weight that is a view gives the bits of its
    # contiguous copy, and the float64 convolution's values.
    x, w, b = inputs()
    view = w.t().contiguous().t() if layout == "transposed" else torch.stack([w, -w], -1).flatten(1)[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, w)
    out = causal_conv1d_fn(x, view, b, silu=True)
    assert torch.equal(out, causal_conv1d_fn(x, w, b, silu=True))
    ref = conv_reference(x, w, b, True, False)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_reverse_reads_later_tokens_only(implementation):
    x, w, b = inputs()
    x2 = x.clone()
    x2[:, 5:] += 1.0
    fwd, fwd2 = causal_conv1d_fn(x, w, b), causal_conv1d_fn(x2, w, b)
    rev, rev2 = causal_conv1d_fn(x, w, b, reverse=True), causal_conv1d_fn(x2, w, b, reverse=True)
    torch.testing.assert_close(fwd[:, :5], fwd2[:, :5])  # token t sees t - 3 .. t
    torch.testing.assert_close(rev[:, :2], rev2[:, :2])  # token t sees t .. t + 3: 0 and 1 do not see token 5
    assert (rev[:, 2:5] - rev2[:, 2:5]).abs().amax(dim=(0, 2)).min() > 1e-3  # 2 .. 4 do


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_finite_differences(implementation, reverse):
    x, w, b = (t.double().requires_grad_() for t in inputs(channels=5, kernel=3))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_fn(*a, silu=True, reverse=reverse), (x, w, b))


def test_float32_gradients_match_the_float64_reference(implementation):
    x, w, b = (t.requires_grad_() for t in inputs())
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    g = torch.randn(3, 9, 20, generator=torch.Generator().manual_seed(1))
    (causal_conv1d_fn(x, w, b, silu=True, reverse=True) * g).sum().backward()
    (conv_reference(x64, w64, b64, True, True) * g.double()).sum().backward()
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


def test_opcheck():
    x, w, b = inputs()
    torch.library.opcheck(causal_conv1d_op, (x, w, b, True, False))
    torch.library.opcheck(causal_conv1d_op, (x.contiguous(), w, None, False, True))


def test_exports_as_one_node():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3)

        def forward(self, x):
            return causal_conv1d_fn(x, self.conv.weight[:, 0], self.conv.bias, silu=True)

    ep = torch.export.export(Conv(), (torch.randn(2, 7, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vmq.causal_conv1d.default) == 1
    assert not any(t in (torch.ops.aten.addcmul.default, torch.ops.aten.pad.default) for t in targets)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 8), torch.randn(8, 4), None), r"x must be \[batch, L, channels\]"),
    ((torch.randn(2, 5, 8), torch.randn(6, 4), None), r"weight must be \[channels=8, K\]"),
    ((torch.randn(2, 5, 8), torch.randn(8, 4), torch.randn(7)), r"bias must be \[channels=8\]"),
])
def test_bad_shapes_are_one_clear_error(implementation, args, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d_fn(*args)
