import copy
from collections import Counter

import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.models import CheckpointMismatchError, create_model
from vmq_fx.pt2e.observers import NotCalibratedError, VectorQuantizedWeight, kmeans, nearest_codewords
from vmq_fx.pt2e.observers.codebook import codebook_shape
from vmq_fx.ops import pack_codes, unpack_codes, vq_dequantize, vq_linear_reference
from vmq_fx.ops.vq_linear import VQLinearArgs, code_bits, decode_row_scale, encode_row_scale, vq_linear
from vmq_fx.pt2e.diagnostics import bits_per_weight
from vmq_fx.pt2e.flow import method_from_name
from vmq_fx.pt2e.vq import _confirm_schedule

VQ_DQ = torch.ops.vmq.vq_dequantize.default
VQ_LINEAR = torch.ops.vmq.vq_linear.default


def _targets(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


# -- k-means and candidates -------------------------------------------------------------------------------------------
def test_kmeans_one_step_matches_direct_lloyd():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, 3, generator=g) + 6 * c for c in torch.eye(3)])  # three clear clusters
    codebook, assign = kmeans(x, 3, iters=1, seed=0)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:3]]
    a0 = torch.cdist(x.double(), init.double()).argmin(1)
    direct = torch.stack([x[a0 == j].double().mean(0) for j in range(3)])
    torch.testing.assert_close(codebook.double(), direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(assign, torch.cdist(x.double(), codebook.double()).argmin(1))


def test_kmeans_iterations_do_not_increase_inertia_and_cover_small_sets():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))

    def inertia(cb, a):
        return (x - cb[a]).pow(2).sum().item()

    values = [inertia(*kmeans(x, 16, iters=i)) for i in (1, 3, 10, 30)]
    assert all(b <= a + 1e-4 for a, b in zip(values, values[1:]))
    cb, a = kmeans(x[:10], 16)  # k >= points: every point is a codeword
    assert cb.shape == (16, 4) and torch.equal(cb[a], x[:10])


def test_nearest_codewords_match_cdist_topk():
    g = torch.Generator().manual_seed(0)
    x, cb = torch.randn(300, 4, generator=g), torch.randn(50, 4, generator=g)
    idx, dist = nearest_codewords(x, cb, 3)
    ref = torch.cdist(x.double(), cb.double()).pow(2)
    ref_d, ref_i = ref.topk(3, dim=1, largest=False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-4, atol=1e-4)


def _vq(rows=24, cols=10, d=4, k=16, n=3, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, rows)[:, None]
    vq = VectorQuantizedWeight(d=d, k=k, n=n)
    vq(w)
    vq.initialize()
    return vq, w


def test_soft_state_scales_with_n_not_k():
    vq, _ = _vq(rows=64, cols=32, d=4, k=256, n=3)
    sub = 64 * 32 // 4
    assert vq.logits.shape == (sub, 3) and vq.candidates.shape == (sub, 3)
    assert all(sub * 256 > t.numel() for t in list(vq.buffers()) + list(vq.parameters()))


def test_soft_weight_gradients_are_the_same_in_every_run():
    """The codebook's gradient sums over every sub-vector that uses a codeword; with two threads an unordered
    (atomic) accumulation gives a different sum in each run, and ViM-VQ's result with it. 8192 sub-vectors x 4
    candidates x 2 values is above ATen's grain size, where its parallel paths start."""
    torch.manual_seed(0)
    vq = VectorQuantizedWeight(d=2, k=16, n=4)
    vq(torch.randn(256, 64))
    vq.initialize()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    grads = []
    try:
        for _ in range(8):
            vq.codebook.grad = vq.logits.grad = None
            vq.weight().pow(2).sum().backward()
            grads.append((vq.codebook.grad.clone(), vq.logits.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)


def test_ratios_start_nearest_first_and_stay_on_the_simplex():
    vq, w = _vq()
    r = vq.ratios()
    assert torch.equal(r.argmax(-1), torch.zeros(len(r), dtype=torch.long))  # the nearest codeword leads
    opt = torch.optim.Adam([vq.logits, vq.codebook], lr=0.1)
    for _ in range(20):
        loss = (vq(w) - w * 1.3).pow(2).mean() + 0.1 * vq.one_hot_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        vq.reselect()
        r = vq.ratios()
        assert (r >= 0).all() and torch.allclose(r.sum(-1), torch.ones(len(r)), atol=1e-6)
        # the soft value is a convex combination of its candidates: inside their bounding box
        cand = vq.codebook[vq.candidates]
        soft = vq.soft_subvectors()
        assert (soft >= cand.amin(1) - 1e-5).all() and (soft <= cand.amax(1) + 1e-5).all()


def test_confirmation_is_monotone_by_confidence_and_ends_all_hard():
    vq, _ = _vq()
    total = len(vq.confirmed)
    before = vq.confirmed.clone()
    for frac in (0.25, 0.5, 0.5, 0.9, 1.0):
        top = vq.ratios().max(-1).values.masked_fill(vq.confirmed, -1)
        codes_before = vq.codes[vq.confirmed].clone()
        added = vq.confirm(frac)
        assert int(vq.confirmed.sum()) == round(frac * total)
        assert (vq.confirmed | ~before).all() and (vq.confirmed >= before).all()  # never un-confirms
        assert torch.equal(vq.codes[before], codes_before)  # confirmed codes stay
        new = vq.confirmed & ~before
        if added and int((~vq.confirmed).sum()):
            assert top[new].min() >= top[~vq.confirmed].max()  # the most confident went first
        before = vq.confirmed.clone()
    assert vq.confirmed.all()
    torch.testing.assert_close(vq.weight(), vq.codebook[vq.codes].reshape(24, -1)[:, :10] * vq.scales[:, None])


def test_confirm_schedule_grows_to_all_at_the_last_step():
    sched = _confirm_schedule(vmq_fx.VQConfig(confirm_rounds=4, confirm_start=0.5), steps=100)
    assert sorted(sched.items()) == [(62, 0.25), (75, 0.5), (87, 0.75), (100, 1.0)]


# -- storage and the op -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 8, 12])
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-13 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 13), codes)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(codes + (1 << bits), bits)


@pytest.mark.parametrize("rows,cols,d,k", [(300, 10, 4, 256), (5, 7, 2, 64), (9, 16, 8, 256), (3, 5, 1, 2),
                                           (4, 30, 4, 4096), (6, 21, 3, 8),  # 12- and 3-bit codes cross bytes
                                           # rows of many 6- and 4-bit groups, the partial code inside the last group
                                           (5, 55, 2, 64), (4, 41, 1, 16), (3, 38, 4, 16)])
def test_vq_linear_matches_dequantize_then_matmul(rows, cols, d, k, implementation):
    g = torch.Generator().manual_seed(rows)
    per_row = -(-cols // d)
    codes = pack_codes(torch.randint(0, k, (rows, per_row), generator=g), code_bits(k))
    codebook = torch.randn(k, d, generator=g).half()
    scale = torch.randint(0, 256, (rows,), generator=g, dtype=torch.uint8)  # the whole 8-bit row-scale range
    bias = torch.randn(rows, generator=g)
    x = torch.randn(2, 17, cols, generator=g)  # odd token count
    ref = vq_linear_reference(x, codes, codebook, scale, bias, cols)
    out = vq_linear(x, codes, codebook, scale, bias, cols)
    assert out.shape == (2, 17, rows) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    w = vq_dequantize(codes, codebook, scale, cols)
    torch.testing.assert_close(w.double() @ x.double().transpose(-1, -2), (ref - bias.double()).transpose(-1, -2),
                               rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.vmq.vq_linear.default, (x, codes, codebook, scale, bias, cols))


def test_vq_linear_keeps_its_decoded_weight_only_while_the_codes_are_unchanged():
    """The C++ kernel decodes a weight once and keeps it (native.vq_decode_mode "once", the default): the same floats
    as a decode per call, and a code, codebook or row scale written in place, or new codes in freed memory, are
    decoded again rather than served from the kept weight."""
    from vmq_fx.ops import native

    kernels = native.kernels()
    assert kernels is not None and kernels.vq_decode_once() and native.vq_decode_mode()[0] == "once"
    g = torch.Generator().manual_seed(0)
    rows, cols, d, k = 40, 36, 2, 64  # 6-bit codes
    new_codes = lambda: pack_codes(torch.randint(0, k, (rows, cols // d), generator=g), code_bits(k))  # noqa: E731
    codes, codebook = new_codes(), torch.randn(k, d, generator=g).half()
    scale, bias = torch.randint(100, 200, (rows,), generator=g, dtype=torch.uint8), torch.randn(rows, generator=g)
    x = torch.randn(3, 7, cols, generator=g)

    def check():
        out = VQ_LINEAR(x, codes, codebook, scale, bias, cols)
        torch.testing.assert_close(out.double(), vq_linear_reference(x, codes, codebook, scale, bias, cols),
                                   rtol=1e-5, atol=1e-5)
        kernels.set_vq_decode_once(False)
        try:
            assert torch.equal(VQ_LINEAR(x, codes, codebook, scale, bias, cols), out)
        finally:
            kernels.set_vq_decode_once(True)
        return out

    outputs = [check(), check()]
    codes.copy_(new_codes())
    outputs.append(check())
    codebook.mul_(-0.5)
    outputs.append(check())
    scale.add_(7)
    outputs.append(check())
    del codes
    codes = new_codes()  # often in the memory just freed
    outputs.append(check())
    assert torch.equal(outputs[0], outputs[1])
    assert all(not torch.allclose(a, b) for a, b in zip(outputs[1:], outputs[2:]))


def test_vq_linear_refuses_an_input_that_requires_grad(implementation):
    codes = pack_codes(torch.randint(0, 16, (3, 2)), 4)
    codebook, scale = torch.randn(16, 4).half(), torch.full((3,), 128, dtype=torch.uint8)
    x = torch.randn(1, 5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"vmq.vq_linear: no backward \(the weights and scales are quantized "):
        torch.ops.vmq.vq_linear(x, codes, codebook, scale, None, 8)
    with torch.no_grad():
        assert torch.ops.vmq.vq_linear(x, codes, codebook, scale, None, 8).shape == (1, 5, 3)


def test_vq_linear_rejects_codes_of_the_wrong_size():
    with pytest.raises(ValueError, match="codes must be uint8"):
        vq_linear(torch.randn(2, 8), torch.zeros(3, 1, dtype=torch.uint8), torch.randn(256, 4), torch.ones(3, dtype=torch.uint8), None, 8)


# -- recipes and bad input --------------------------------------------------------------------------------------------
def test_recipe_bits_and_errors():
    assert (recipes.vimvq(2).d, recipes.vimvq(2).k, recipes.vimvq(2).bits) == (None, None, 2)  # chosen per codebook
    assert recipes.vimvq(bits=None, d=4, k=4096).bits == 3
    assert recipes.vimvq(None, d=3, k=64).bits == 2 and recipes.vimvq(None, d=3, k=256).bits == pytest.approx(2.6667)
    with pytest.raises(ValueError, match="bits must be 1, 2 or 3"):
        recipes.vimvq(4)
    with pytest.raises(ValueError, match="both d and k"):
        recipes.vimvq(2, d=4)
    with pytest.raises(ValueError, match="method"):
        vmq_fx.VQRecipe(method="gptvq")
    with pytest.raises(ValueError, match="spend 1 bits per weight, not bits=2"):
        recipes.vimvq(2, d=8, k=256)  # the name and the saved bits could not disagree
    assert recipes.vimvq(None, d=8, k=256).name == "vimvq-1bit[d=8,k=256]"
    with pytest.raises(ValueError, match="codebook must be"):
        recipes.vimvq(2, codebook="model")


@pytest.mark.parametrize("bits,weights,expected", [
    (2, 264_192, (4, 256)), (2, 71_232, (2, 16)), (3, 71_232, (2, 64)), (1, 71_232, (4, 16)),
    (1, 264_192, (8, 256)), (3, 264_192, (2, 64)), (2, 100, (1, 4))])
def test_codebook_shape_is_the_longest_sub_vector_within_budget(bits, weights, expected):
    d, k = codebook_shape(bits, weights, 0.125)
    assert (d, k) == expected
    assert k == 2 ** (bits * d) and k <= 256
    assert d == 1 or k * d * 16 <= 0.125 * weights  # within budget, unless nothing is
    longer = 2 * d
    assert longer > 8 or bits * longer > 8 or (2 ** (bits * longer)) * longer * 16 > 0.125 * weights  # maximal


def test_row_scale_codes_are_a_log_grid():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = torch.tensor([2.0 ** (c / 16 - 12) for c in range(256)], dtype=torch.float64)
    torch.testing.assert_close(decode_row_scale(codes).double(), expected, rtol=1e-6, atol=0)
    s = torch.logspace(-3.5, 1.1, 500, dtype=torch.float64)  # inside the grid's range
    rel = (decode_row_scale(encode_row_scale(s.float())).double() / s - 1).abs()
    assert rel.max() <= 2 ** (1 / 32) - 1 + 1e-6  # at most half a step of 2^(1/16) away
    assert encode_row_scale(torch.tensor([1e-9, 1e9])).tolist() == [0, 255]  # clamped at the ends
    with pytest.raises(ValueError, match=r"vq-kmeans-2bit has no optimization step, so no field 'steps'"):
        method_from_name("vq-kmeans-2bit[steps=5]")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("vim_fm_tiny", depth=2).eval()
    gm = vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()
    return model, gm, torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_vector_quantize_needs_calibration_and_a_vq_recipe(tiny):
    _, gm, calib = tiny
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vimvq(2)))
    with pytest.raises(ValueError, match="not calibrated"):
        vmq_fx.vector_quantize(prepared, calib)
    with pytest.raises(ValueError, match="calibration data is empty"):
        vmq_fx.calibrate(prepared, torch.empty(0, 1, 28, 28))
    vmq_fx.calibrate(prepared, calib, progress=False)
    with pytest.raises(NotCalibratedError, match="vector_quantize"):
        convert_pt2e(copy.deepcopy(prepared))  # codes not final yet
    ptq = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    with pytest.raises(ValueError, match="VQ recipe"):
        vmq_fx.vector_quantize(ptq, calib)


def test_end_to_end_vimvq_graph_numbers_and_save_load(tiny, tmp_path):
    model, gm, calib = tiny
    results = {}
    for recipe, config in ((recipes.vq_kmeans(2), None), (recipes.vimvq(2), vmq_fx.VQConfig(steps=24, batch_size=16))):
        prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipe))
        vmq_fx.calibrate(prepared, calib, progress=False)
        _assert_nearest_codewords(prepared)
        report = vmq_fx.vector_quantize(prepared, calib, config, progress=False)
        results[recipe.method] = report
        x = torch.randn(3, 1, 28, 28)
        fake = prepared(x)
        quantized = convert_pt2e(prepared)
        assert _targets(quantized)[VQ_DQ] == 12  # 6 linears per Vim block, weights only
        assert not any("quantize_per" in str(t) for t in _targets(quantized))  # activations stay float
        q_out = quantized(x)
        torch.testing.assert_close(q_out, fake, rtol=1e-5, atol=1e-5)
        # the linears compute the Q/DQ graph's floats: bit-equal with the norms left as the six operators, and to
        # float rounding with each as one vmq.rms_norm / add_rms_norm (the default; its sum of squares in its own order)
        assert torch.equal(vmq_fx.lower(copy.deepcopy(quantized), fuse_norms=False)(x), q_out)
        lowered = vmq_fx.lower(quantized)
        t = _targets(lowered)
        assert t[VQ_LINEAR] == 12 and t[VQ_DQ] == 0 and t[torch.ops.aten.linear.default] == 1  # the head
        # the first norm reads the embeddings (plus a broadcast position embedding), the others a residual add
        assert t[torch.ops.vmq.rms_norm.default] == 1 and t[torch.ops.vmq.add_rms_norm.default] == 2
        torch.testing.assert_close(lowered(x), q_out, rtol=1e-5, atol=1e-5)
        assert not any(k.endswith("in_proj.weight") for k in lowered.state_dict())  # float weights dropped
        # the float model with every weight replaced by its decoded codes (float64 decode of the bit stream)
        decoded = _with_decoded_weights(model, lowered)
        torch.testing.assert_close(lowered(x), decoded(x), rtol=1e-4, atol=1e-5)
    # the optimization lowers the block reconstruction loss of plain k-means
    assert sum(results["incremental"].loss_after) < 0.9 * sum(results["incremental"].loss_kmeans)

    path = tmp_path / "vim_vq2.safetensors"
    vmq_fx.save_quantized(lowered, path, model.config)
    loaded = vmq_fx.load_quantized(path)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(x), lowered(x))


def _assert_nearest_codewords(prepared):
    """After calibration every sub-vector's code is its nearest codeword (brute-force distances in float64). Plain
    k-means layers have their codebook rounded to float16 at calibration's end (what convert stores): a few
    sub-vectors in a thousand then sit nearer another rounded codeword."""
    for layer, _, vq in vmq_fx.pt2e.utils.linear_quantizers(prepared).values():
        w = prepared.get_parameter(layer.name + ".weight").detach().double()
        w = w / vq.scales.double()[:, None]
        sub = torch.nn.functional.pad(w, (0, -w.shape[1] % vq.d)).reshape(-1, vq.d)
        nearest = torch.cdist(sub, vq.codebook.detach().double()).argmin(1)
        rounded = not layer.recipe.optimizes
        assert (nearest == vq.codes).float().mean() > (0.995 if rounded else 0.999)  # float32 ties aside


def _with_decoded_weights(model, lowered):
    """A copy of ``model`` whose quantized linears hold the weights ``lowered``'s vq_linear nodes decode to, decoded
    by ``vq_linear_reference`` on an identity input."""
    out = copy.deepcopy(model)
    by_flat = {name.replace(".", "_"): name for name, _ in out.named_parameters()}
    replaced = 0
    for node in lowered.graph.nodes:
        if node.target is VQ_LINEAR:
            args = VQLinearArgs.from_node(node)
            codes, codebook, scale = (lowered.get_buffer(str(a.target)) for a in (args.codes, args.codebook,
                                                                                   args.row_scale))
            k_in = args.in_features
            w = vq_linear_reference(torch.eye(k_in), codes, codebook, scale, None, k_in).t()
            name = by_flat[str(args.codes.target).removesuffix("_vq_codes")]
            out.get_parameter(name).data.copy_(w.float())
            replaced += 1
    assert replaced
    return out


def _all_in_bits(lowered) -> float:
    """Bits per weight counted from the shapes: codes at their width, float16 codebooks once each, 8-bit row
    scales."""
    codebooks, total, weights = {}, 0, 0
    for node in lowered.graph.nodes:
        if node.target is VQ_LINEAR:
            args = VQLinearArgs.from_node(node)
            codebook = lowered.get_buffer(str(args.codebook.target))
            k, d = codebook.shape
            rows, k_in = lowered.get_buffer(str(args.codes.target)).shape[0], args.in_features
            total += rows * -(-(-(-k_in // d)) * code_bits(k) // 8) * 8 + rows * 8
            codebooks[str(args.codebook.target)] = k * d * 16
            weights += rows * k_in
    return (total + sum(codebooks.values())) / weights


@pytest.mark.parametrize("bits", [3, 2, 1])
def test_block_codebooks_keep_all_in_bits_within_a_quarter_bit(tiny, bits):
    model, gm, calib = tiny
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vq_kmeans(bits)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    vmq_fx.vector_quantize(prepared, calib, progress=False)
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    nodes = [n for n in lowered.graph.nodes if n.target is VQ_LINEAR]
    codebooks = {str(VQLinearArgs.from_node(n).codebook.target) for n in nodes}
    assert len(nodes) == 12 and len(codebooks) == 2  # one codebook per block, shared by its six linears
    assert bits_per_weight(lowered) == pytest.approx(_all_in_bits(lowered), rel=1e-9)
    assert bits <= bits_per_weight(lowered) <= bits + 0.25
    per_layer = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vq_kmeans(bits, codebook="layer")))
    vmq_fx.calibrate(per_layer, calib, progress=False)
    vmq_fx.vector_quantize(per_layer, calib, progress=False)
    assert len({str(VQLinearArgs.from_node(n).codebook.target) for n in vmq_fx.lower(convert_pt2e(per_layer)).graph.nodes
                if n.target is VQ_LINEAR}) == 12


def test_dt_proj_with_input_not_divisible_by_d_is_padded(tiny):
    model, gm, calib = tiny  # dt_proj has K = dt_rank = 6, d = 8
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vq_kmeans(None, d=8, k=256)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    vmq_fx.vector_quantize(prepared, calib, progress=False)
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    args = next(a for a in (VQLinearArgs.from_node(n) for n in lowered.graph.nodes if n.target is VQ_LINEAR)
                if "layers_0_mixer_dt_proj_" in str(a.codes.target))
    codes, codebook, row_scale = (lowered.get_buffer(str(a.target)) for a in (args.codes, args.codebook,
                                                                              args.row_scale))
    assert args.bias is None  # Mamba adds dt_proj's bias in the scan (delta_bias)
    assert args.in_features == 6 and codes.shape == (192, 1)  # one 8-bit code per row: one padded 8-vector
    # The weight the codes stand for, decoded here: codeword (its first 6 of 8 entries) times the row scale 2^(c/16-12)
    w_dec = codebook.double()[codes[:, 0].long(), :6] * (2.0 ** (row_scale.double() / 16 - 12))[:, None]
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0))
    out = torch.ops.vmq.vq_linear(x, codes, codebook, row_scale, None, 6)
    torch.testing.assert_close(out.double(), x.double() @ w_dec.T, rtol=1e-5, atol=1e-6)
    # ... and it is a fit of the float weight (k-means over the block's sub-vectors), not merely the right shape:
    # codes shifted by one row, or the padding read as weights, land far off.
    w = model.layers[0].mixer.dt_proj.weight.detach().double()
    err = ((w_dec - w).norm() / w.norm()).item()
    assert err < 0.6, err
    assert ((w_dec.roll(1, 0) - w).norm() / w.norm()).item() > 1.2 * err


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        vmq_fx.load_quantized(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read"):
        vmq_fx.load_quantized(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a vmq_fx quantized model"):
        vmq_fx.load_quantized(other)


def test_load_quantized_reports_mismatched_tensors(tiny, tmp_path):
    model, gm, calib = tiny
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vq_kmeans(2)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    vmq_fx.vector_quantize(prepared, calib, progress=False)
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    path = tmp_path / "m.safetensors"
    vmq_fx.save_quantized(lowered, path, model.config)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop(next(k for k in tensors if k.startswith("vq_codebook")))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        vmq_fx.load_quantized(path)


def test_blockwise_loss_on_all_images_of_vmamba_blocks():
    """VMamba blocks get the batch size as an int argument next to parameters: it must follow the batch given. The
    per-block losses on all 80 images (captured in chunks of 64 and 16) against an independent computation: the eager
    float model and a copy holding the decoded k-means weights, run on all images at once, each block's output
    compared by ``1 - cos`` over channels, averaged over tokens."""
    torch.manual_seed(0)
    model = create_model("vmamba_fm_tiny", depths=(1, 1)).eval()
    gm = vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()
    prepared = prepare_pt2e(gm, VisualMambaQuantizer(recipes.vq_kmeans(2)))
    calib = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    vmq_fx.calibrate(prepared, calib, progress=False)
    report = vmq_fx.vector_quantize(prepared, calib, progress=False)
    decoded = _with_decoded_weights(model, vmq_fx.lower(convert_pt2e(prepared)))
    blocks = ("layers.0.blocks.0", "layers.1.blocks.0")

    def block_outputs(net):
        seen = {}
        hooks = [net.get_submodule(b).register_forward_hook(lambda m, i, o, b=b: seen.update({b: o.double()}))
                 for b in blocks]
        with torch.no_grad():
            net(calib)
        for h in hooks:
            h.remove()
        return seen

    fp, q = block_outputs(model), block_outputs(decoded)
    expected = [(1 - torch.nn.functional.cosine_similarity(fp[b], q[b], dim=-1)).mean().item() for b in blocks]
    assert report.blocks == 2
    # float32 against float64 (~2e-7 apart); scoring the first 64 images only is ~1e-3 off
    assert report.loss_after == pytest.approx(expected, rel=1e-5), (report.loss_after, expected)


def test_load_quantized_reads_registered_ops_only(tiny, tmp_path):
    import base64
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    model, _, _ = tiny
    lowered = vmq_fx.quantize(model, recipes.per_tensor_static(8, 8), torch.randn(4, 1, 28, 28), progress=False).lowered
    path = tmp_path / "m.safetensors"
    vmq_fx.save_quantized(lowered, path, model.config)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    graph = json.loads(zlib.decompress(base64.b64decode(meta["graph"])))
    lowered_linears = sum(n.target is torch.ops.vmq.int8_linear.default for n in lowered.graph.nodes)
    assert sum(n.get("target") == "vmq.int8_linear.default" for n in graph["nodes"]) == lowered_linears > 0
    for bad in ("builtins.eval", "os.system.default", "aten.add"):
        node = next(n for n in graph["nodes"] if n["op"] == "call_function")
        node["target"] = bad
        meta["graph"] = base64.b64encode(zlib.compress(json.dumps(graph).encode())).decode()
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match="not a registered op"):
            vmq_fx.load_quantized(path)
