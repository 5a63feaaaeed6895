import operator

import pytest
import torch
import torch.nn.functional as F

from vmq_fx.ops import native
import vmq_fx.ops.selective_scan as scan_mod
from vmq_fx.ops import selective_scan_fn, selective_scan_op


def scan_loop_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent float64 reference: one step at a time, groups indexed explicitly."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape

    def per_channel(t, step):  # -> [batch, dim, N]
        if t.dim() == 3:
            return t[:, None, :, step].expand(batch, dim, t.shape[1])
        group = torch.arange(dim) // (dim // t.shape[1])
        return t[:, group, :, step]

    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for step in range(length):
        dt = delta[:, :, step, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, step, None] * per_channel(B, step)
        ys.append((h * per_channel(C, step)).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D.double()[:, None] * u
    if z is not None:
        out = out * F.silu(z.double())
    return out, h


def make_inputs(batch=2, dim=8, length=13, n=4, groups_b=None, groups_c=None, dtype=torch.float32, seed=0,
                with_d=True, with_z=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = lambda groups: r(batch, n, length) if groups is None else r(batch, groups, n, length)  # noqa: E731
    args = dict(
        u=r(batch, dim, length),
        delta=0.5 * r(batch, dim, length),
        A=-(torch.rand(dim, n, generator=g) + 0.2),
        B=bc(groups_b),
        C=bc(groups_c),
        D=r(dim) if with_d else None,
        z=r(batch, dim, length) if with_z else None,
        delta_bias=r(dim) if with_bias else None,
    )
    return {k: (v.to(dtype) if v is not None and k != "A" else v) for k, v in args.items()}


SHAPES = [
    dict(),  # B, C: [batch, N, L]
    dict(groups_b=4, groups_c=4, dim=8),  # VMamba-style grouped B, C
    dict(groups_b=2, dim=6, length=7),  # grouped B, shared C
    dict(batch=1, dim=3, length=1, n=2),  # single step
    dict(with_d=False, with_z=False, with_bias=False),
    dict(batch=3, dim=40, length=19, n=16),  # two full 16-channel blocks and a partial one
    dict(batch=2, dim=72, length=9, n=5, groups_b=2, groups_c=2),  # blocks cut at group edges, N not specialized
    dict(batch=2, dim=32, length=11, n=1, groups_b=4, groups_c=4),  # VMamba v2: d_state 1
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softplus", [True, False])
def test_forward_matches_mamba_ssm_ref_and_float64_loop(shape, softplus, mamba_ssm_ref, implementation):
    args = make_inputs(**shape)
    out, last = selective_scan_fn(**args, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = mamba_ssm_ref(**args, delta_softplus=softplus, return_last_state=True)
    loop_out, loop_last = scan_loop_f64(**args, delta_softplus=softplus)
    assert out.shape == ref_out.shape and last.shape == ref_last.shape
    scale = loop_out.abs().max()
    torch.testing.assert_close(out.double(), loop_out, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(last.double(), loop_last, atol=1e-5 * loop_last.abs().max(), rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5 * scale, rtol=1e-5)


def test_float64_inputs_compute_in_float64(implementation):
    args = {k: (v.double() if v is not None else None) for k, v in make_inputs(length=40).items()}
    out, last = selective_scan_fn(**args, delta_softplus=True, return_last_state=True)
    loop_out, loop_last = scan_loop_f64(**args, delta_softplus=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loop_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(last, loop_last, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_ref(dtype, mamba_ssm_ref, implementation):
    args = make_inputs(dtype=dtype, length=21)
    out = selective_scan_fn(**args, delta_softplus=True)
    ref = mamba_ssm_ref(**args, delta_softplus=True)
    assert out.dtype == dtype
    # Both compute in float32 and round once at the end: they may differ by one rounding step of the output.
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 * ref.float().abs().max().item(), rtol=1e-2)


def test_chunked_path_matches_the_whole_scan(monkeypatch):
    args = make_inputs(length=37)
    with native.disabled():  # the chunking is the pure-torch implementation's
        whole = selective_scan_fn(**args, delta_softplus=True, return_last_state=True)
        monkeypatch.setattr(scan_mod, "_STATE_ELEMENTS", 8 * 4)  # one image per batch slice
        monkeypatch.setattr(scan_mod, "_CHUNK_ELEMENTS", 8 * 4 * 5)  # 5 steps per chunk, last chunk partial
        chunked = selective_scan_fn(**args, delta_softplus=True, return_last_state=True)
    # Not bit-equal: the chunks' einsums sum in another order than the whole one's (BLAS picks its blocking per CPU
    # and shape). Float32 rounding over the L = 37 steps bounds the gap by about L * eps ~ 4e-6 relative; a state
    # lost or doubled at a chunk seam changes outputs by O(1).
    bound = 37 * torch.finfo(torch.float32).eps
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=bound, atol=bound * want.abs().max().item())


def _loss(out, last):
    # Weights every output so that a wrong gradient of any element shows.
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * w).sum() + (last**2).sum()


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def _assert_gradients_match_float64_loop(shape):
    base = {k: (v.double() if v is not None else None) for k, v in make_inputs(**shape).items()}
    leaves = {k: v.clone().requires_grad_() for k, v in base.items() if v is not None}
    ours = torch.autograd.grad(_loss(*selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True)),
                               list(leaves.values()))
    leaves2 = {k: v.clone().requires_grad_() for k, v in base.items() if v is not None}
    ref = torch.autograd.grad(_loss(*scan_loop_f64(**leaves2, delta_softplus=True)), list(leaves2.values()))
    for name, g_ours, g_ref in zip(leaves, ours, ref):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_float64_loop(shape, implementation):
    _assert_gradients_match_float64_loop(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_across_batch_slices_and_chunks_match_float64_loop(shape, monkeypatch):
    # one image per batch slice, 3 steps per chunk: both seams of the pure-torch backward (the C++ one has none)
    monkeypatch.setattr(scan_mod, "_STATE_ELEMENTS", 1)
    monkeypatch.setattr(scan_mod, "_CHUNK_ELEMENTS", 3 * 8 * 4)
    with native.disabled():
        _assert_gradients_match_float64_loop(shape)


def test_gradients_match_mamba_ssm_ref_float32(mamba_ssm_ref, implementation):
    base = make_inputs(groups_b=4, groups_c=4, length=17)
    grads = []
    for fn in (selective_scan_fn, mamba_ssm_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
        loss = _loss(*fn(**leaves, delta_softplus=True, return_last_state=True))
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, g_ours, g_ref in zip(base, *grads):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-4 * g_ref.abs().max().item(), rtol=1e-4, msg=name)


def test_gradcheck_small(implementation):
    args = {k: v.double().requires_grad_() for k, v in make_inputs(batch=1, dim=4, length=5, n=2,
                                                                      groups_b=2).items()}
    fn = lambda *a: selective_scan_fn(*a, delta_softplus=True, return_last_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(args.values()))


def _flipped(args):
    """u, delta, B, C, z flipped along the sequence axis (their last)."""
    return {k: v.flip(-1) if v is not None and k in ("u", "delta", "B", "C", "z") else v for k, v in args.items()}


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[5], SHAPES[6]])
def test_reverse_equals_the_float64_loop_on_the_flipped_sequence(shape, implementation):
    base = {k: v.double() if v is not None else v for k, v in make_inputs(**shape).items()}
    leaves = {k: v.clone().requires_grad_() if v is not None else v for k, v in base.items()}
    out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, reverse=True)
    leaves_ref = {k: v.clone().requires_grad_() if v is not None else v for k, v in base.items()}
    out_ref, last_ref = scan_loop_f64(**_flipped(leaves_ref), delta_softplus=True)
    out_ref = out_ref.flip(-1)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(last, last_ref, atol=1e-10, rtol=1e-9)
    names = [k for k, v in base.items() if v is not None]
    ours = torch.autograd.grad(_loss(out, last), [leaves[k] for k in names])
    ref = torch.autograd.grad(_loss(out_ref, last_ref), [leaves_ref[k] for k in names])
    for name, g_ours, g_ref in zip(names, ours, ref):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-9, msg=f"gradient of {name}")
    # and it is not the forward scan: the first position sees the whole sequence
    forward = selective_scan_fn(**base, delta_softplus=True)
    assert (forward[..., 0] - out[..., 0].detach()).abs().max() > 1e-3


def test_reverse_gradcheck_and_opcheck(implementation):
    args = {k: v.double().requires_grad_() for k, v in make_inputs(batch=1, dim=4, length=5, n=2,
                                                                      groups_b=2).items()}
    fn = lambda *a: selective_scan_fn(*a, delta_softplus=True, return_last_state=True, reverse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(args.values()))
    torch.library.opcheck(selective_scan_op, tuple(make_inputs(length=6).values()) + (True, True))


def test_only_requested_gradients_are_computed(implementation):
    args = make_inputs()
    u = args["u"].clone().requires_grad_()
    out = selective_scan_fn(**{**args, "u": u}, delta_softplus=True)
    (g,) = torch.autograd.grad(out.sum(), [u])
    assert g.shape == u.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_output_is_stored_sequence_major_by_every_implementation_and_the_fake(reverse, implementation):
    args = make_inputs(batch=3, dim=40, length=19, n=16)  # strides of a contiguous [batch, L, dim]: (760, 1, 40)
    out, _ = selective_scan_op(*args.values(), True, reverse)
    assert out.shape == (3, 40, 19) and out.stride() == (19 * 40, 1, 40)
    with torch._subclasses.FakeTensorMode() as mode:
        fake, _ = selective_scan_op(*(mode.from_tensor(v) for v in args.values()), True, reverse)
    assert fake.stride() == out.stride()


@pytest.mark.parametrize("reverse", [False, True])
def test_sequence_major_inputs_match_the_float64_loop(reverse, implementation):
    """u, delta, z, B and C as Vim passes them: [batch, dim, L] views of sequence-major memory, z a window of a wider
    row (in_proj's second half), B and C windows of x_proj's output rows, which the kernels read in place (u, delta, z
    for full blocks of channels; they pack the rest)."""
    args = make_inputs(batch=3, dim=40, length=19, n=16)  # full 16-, 8- and 4-channel blocks, and a partial one
    g = torch.Generator().manual_seed(1)
    wide = torch.cat([torch.randn(3, 19, 40, generator=g), args["z"].transpose(1, 2)], dim=-1)
    x_proj = torch.cat([torch.randn(3, 19, 5, generator=g), args["B"].transpose(1, 2), args["C"].transpose(1, 2)], -1)
    seq = {**args, "u": args["u"].transpose(1, 2).contiguous().transpose(1, 2),
           "delta": args["delta"].transpose(1, 2).contiguous().transpose(1, 2), "z": wide[..., 40:].transpose(1, 2),
           "B": x_proj[..., 5:21].transpose(1, 2), "C": x_proj[..., 21:].transpose(1, 2)}
    assert seq["u"].stride() == (760, 1, 40) and seq["z"].stride() == (1520, 1, 80)
    assert seq["B"].stride() == (19 * 37, 1, 37) and torch.equal(seq["C"], args["C"])
    out, last = selective_scan_fn(**seq, delta_softplus=True, return_last_state=True, reverse=reverse)
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    ref_out, ref_last = scan_loop_f64(**{k: flip(v) if k in ("u", "delta", "z", "B", "C") else v
                                         for k, v in args.items()}, delta_softplus=True)
    scale = ref_out.abs().max()
    torch.testing.assert_close(out.double(), flip(ref_out), atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(last.double(), ref_last, atol=1e-5 * ref_last.abs().max(), rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_long_sequences_match_the_float64_loop_across_runs_of_blocks(reverse, implementation):
    """At L = 400 the kernels take a (batch, group)'s channel blocks in several runs (runs of 2, 5 and 10 blocks in
    the avx512, avx2 and generic builds), sequence-major or not, with B in two groups."""
    args = make_inputs(batch=2, dim=72, length=400, n=16, groups_b=2)
    for seq in (False, True):
        if seq:  # B [batch, groups, N, L] a view of [batch, L, groups, N] memory, C of [batch, L, N]
            args = {**args, **{k: args[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("u", "delta", "z")},
                    "B": args["B"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
                    "C": args["C"].transpose(1, 2).contiguous().transpose(1, 2)}
            assert args["B"].stride() == (400 * 32, 16, 1, 32)
        out, last = selective_scan_fn(**args, delta_softplus=True, return_last_state=True, reverse=reverse)
        flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
        ref_out, ref_last = scan_loop_f64(**{k: flip(v) if k in ("u", "delta", "z", "B", "C") else v
                                             for k, v in args.items()}, delta_softplus=True)
        torch.testing.assert_close(out.double(), flip(ref_out), atol=1e-5 * ref_out.abs().max(), rtol=1e-5)
        torch.testing.assert_close(last.double(), ref_last, atol=1e-5 * ref_last.abs().max(), rtol=1e-5)


def test_opcheck(implementation):
    args = make_inputs(length=6)
    torch.library.opcheck(selective_scan_op, tuple(args.values()) + (True,))


def test_export_keeps_one_scan_node():
    class M(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return selective_scan_fn(u, delta, A, B, C, delta_softplus=True)

    a = make_inputs(with_d=False, with_z=False, with_bias=False)
    ex = (a["u"], a["delta"], a["A"], a["B"], a["C"])
    ep = torch.export.export(M(), ex)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vmq.selective_scan.default) == 1
    assert set(targets) == {torch.ops.vmq.selective_scan.default, operator.getitem}  # nothing decomposed
    torch.testing.assert_close(ep.module()(*ex), M()(*ex), atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=torch.randn(2, 8)), "u must be"),
        (dict(delta=torch.randn(2, 8, 12)), "delta must have"),
        (dict(A=torch.randn(7, 4)), "A must be"),
        (dict(B=torch.randn(8, 4)), "input-independent"),
        (dict(C=torch.randn(2, 3, 4, 13)), "G dividing dim"),
        (dict(D=torch.randn(5)), "D must be"),
        (dict(z=torch.randn(2, 8, 3)), "z must have"),
    ],
)
def test_bad_shapes_raise_clear_errors(change, message, implementation):
    args = {**make_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan_fn(**args)


def assert_softplus_scan_matches_loop(args):
    """The scan with softplus, its output and last state, within 1e-5 (relative, and of the largest value) of the
    float64 loop."""
    out, last = selective_scan_fn(**args, delta_softplus=True, return_last_state=True)
    loop_out, loop_last = scan_loop_f64(**args, delta_softplus=True)
    torch.testing.assert_close(out.double(), loop_out, atol=1e-5 * loop_out.abs().max(), rtol=1e-5)
    torch.testing.assert_close(last.double(), loop_last, atol=1e-5 * loop_last.abs().max(), rtol=1e-5)


def test_extreme_time_steps_match_float64_loop(implementation):
    # softplus tails (delta + bias far below 0 and above its pass-through at 20) and decays that underflow to 0
    args = make_inputs(batch=2, dim=20, length=15, n=16)
    args["delta"] = torch.linspace(-60, 60, args["delta"].numel()).reshape(args["delta"].shape)
    assert_softplus_scan_matches_loop(args)


def underflowing_decay_inputs(dim):
    """Inputs whose decays exp(dt A) fall below float32's normal range (dt A log2(e) < -126) in most channels: dt = 30
    (softplus passes it through) in all channels but the last 8, whose dt ~ 0.97 keeps them in range; A from -0.5 to
    -9.5, so dt A log2(e) spans -22 to -411."""
    args = make_inputs(batch=1, dim=dim, length=4, n=16, with_d=False, with_z=False, with_bias=False)
    args["delta"] = torch.full((1, dim, 4), 30.0)
    args["delta"][:, dim - 8:] = 0.5
    args["A"] = -(0.5 + 0.3 * ((torch.arange(16) + torch.arange(dim)[:, None]) % 31)).float()
    return args


def test_decays_below_the_float_range_match_float64_loop(implementation):
    """The kernels' 2^x without clamps (builds other than AVX-512) wraps its exponent below 2^-126 into a huge or
    infinite decay, so the scan drops the clamps only for channel blocks whose largest dt times most negative A stays
    in range. Here most blocks leave it (their decays are ~0) and the last stays in; every output must match the
    float64 loop."""
    args = underflowing_decay_inputs(40)
    assert_softplus_scan_matches_loop(args)


def test_a_growing_decay_overflows_with_softplus(implementation):
    """With softplus and A <= 0 (Mamba's A = -exp(A_log)) every decay exp(dt A) is at most 1, and the kernels' 2^x
    skips its upper clamp there; one positive A in a block must keep it. Channel 3 has A = +1 and dt = 100: exp(100)
    overflows float32, and its second output is not finite (NaN in torch and in the AVX-512 build, whose 2^x
    saturates to inf, and inf * 0 is the first step's NaN; inf where 2^x is clamped at 2^127). A 2^x whose exponent
    wrapped past the missing clamp gave a tiny negative decay and a finite output instead. The other channels stay
    finite."""
    args = make_inputs(batch=1, dim=8, length=2, n=4, with_d=False, with_z=False, with_bias=False)
    args["A"] = -torch.rand(8, 4) - 0.5
    args["A"][3] = 1.0
    args["u"], args["B"], args["C"] = torch.ones(1, 8, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 2)
    args["delta"] = torch.full((1, 8, 2), 100.0)
    out = selective_scan_fn(**args, delta_softplus=True)
    assert not torch.isfinite(out[0, 3, 1]), out[0, 3]
    assert torch.isfinite(torch.cat([out[0, :3], out[0, 4:]])).all()
