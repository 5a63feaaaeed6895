"""Rotated linears (vmq_fx.pt2e.rotation, PTQ4VMRecipe.rotation): the matrices, the prepared / converted / lowered
graphs and their numbers against float64 computations written here, ONNX, saving."""
import copy
from collections import Counter

import onnx
import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.export import ort_session
from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.pt2e.observers.fake_quantize import ROTATION_META, SMOOTHING_META
from vmq_fx.pt2e.quantizer import quantized_linears
from vmq_fx.pt2e.rotation import hadamard, klt
from vmq_fx.pt2e.utils import linear_quantizers, set_fake_quant

EYE_TOL = 1e-12  # float64 orthogonality: a wrong normalization or sign pattern is off by O(1)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _sqnr(out, ref):
    return (10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())).item()


@pytest.mark.parametrize("d", [1, 2, 3, 6, 12, 48, 64, 96, 192])
def test_hadamard_is_orthogonal_and_mixes_every_channel(d):
    r = hadamard(d)
    assert r.dtype == torch.float64 and r.shape == (d, d)
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=EYE_TOL, rtol=0)
    if d > 1:
        assert (r != 0).all()  # every output channel takes a share of every input channel
    if d & (d - 1) == 0:  # a power of two: Sylvester's matrix, every entry +-1/sqrt(d)
        assert torch.allclose(r.abs(), torch.full((d, d), d ** -0.5, dtype=torch.float64), atol=EYE_TOL, rtol=0)


def test_hadamard_refuses_a_size_below_one():
    with pytest.raises(ValueError, match="positive integer"):
        hadamard(0)


def test_klt_rotation_decorrelates_then_spreads():
    torch.manual_seed(0)
    mix = torch.randn(24, 24, dtype=torch.float64)
    x = torch.randn(500, 24, dtype=torch.float64) @ mix
    x[:, 5] *= 30  # an outlier channel
    moment = x.T @ x
    r = klt(moment)
    assert torch.allclose(r @ r.T, torch.eye(24, dtype=torch.float64), atol=1e-10, rtol=0)
    # r = K @ H: K = r @ H^T diagonalizes the second moment (the KLT), whatever eigenvector order / signs it has
    k = r @ hadamard(24).T
    d = k.T @ moment @ k
    assert (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-8 * d.abs().max()
    # and the rotated inputs have no outlier channel left
    ratio = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(x) > 10 and ratio(x @ r) < 3


def test_klt_refuses_a_matrix_that_is_not_square_or_not_finite():
    with pytest.raises(ValueError, match="square"):
        klt(torch.ones(3, 4))
    with pytest.raises(ValueError, match="not finite"):
        klt(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("name,rotation", [("hadamard-pts-w4a4", "hadamard"), ("klt-pts-w4a8", "klt"),
                                           ("klt-sq-pts-w8a8", "klt"), ("ptq4vm-w4a4[rotation='hadamard']", "hadamard")])
def test_recipe_names_carry_the_rotation(name, rotation):
    r = recipes.from_name(name)
    assert r.rotation == rotation
    assert recipes.from_name(r.name) == r


def test_rotation_needs_per_token_static_activations():
    with pytest.raises(ValueError, match="rotations are fitted with per-token static"):
        recipes.per_token_dynamic(4, 4, rotation="hadamard")
    with pytest.raises(ValueError, match="rotation='givens' is not one of 'none', 'hadamard', 'klt'"):
        recipes.from_name("hadamard-pts-w4a4[rotation=givens]")
    with pytest.raises(ValueError, match="rotation must be one of none, hadamard, klt"):
        recipes.pts(4, 4, rotation="givens")


def _calibrated(gm, recipe, n=16, seed=1):
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipe))
    vmq_fx.calibrate(prepared, torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)),
                     progress=False)
    return prepared


@pytest.mark.parametrize("model", ["vim", "vmamba"])
@pytest.mark.parametrize("recipe", ["hadamard-pts-w8a8", "klt-sq-pts-w8a8"])
def test_rotated_then_unrotated_linears_are_the_original_model(model, recipe, request):
    """Fake quantization off, every linear computes (x / s) @ R @ ((W * s) @ R)^T: the FP model up to float32
    rounding. A rotation applied on one side only (or a non-orthogonal one) is off by O(1)."""
    fp, gm = request.getfixturevalue(model)
    prepared = _calibrated(gm, recipes.from_name(recipe))
    quantizers = linear_quantizers(prepared)
    rotations = [act.rotation_matrix for _, act, _ in quantizers.values()]
    assert all(r is not None for r in rotations)
    for (_, act, weight), r in zip(quantizers.values(), rotations):
        assert weight.rotation_matrix is r  # one matrix, shared by the pair
        eye = torch.eye(r.shape[0], dtype=torch.float64)
        assert torch.allclose(r.double() @ r.double().T, eye, atol=1e-6, rtol=0)
    set_fake_quant(quantizers, False)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(prepared(x), fp(x)) < 1e-5


def _float64_linear(gm, node, x):
    """A lowered vmq.int8_linear computed here in float64 from its constants: quantize x per token, integer weight
    times its row scales, bias. The levels are rounded from float32 x * (1 / scale), as the op (and torch's
    quantize_per_channel) defines them: float64 x / scale can round a near tie the other way (on an AMD EPYC with one
    thread, one level of 13,056 did, and moved the output 2e-4)."""
    a = Int8LinearArgs.from_node(node)
    get = lambda n: getattr(gm, n.target) if n is not None else None  # noqa: E731
    act_scale = get(a.act_scale).float()
    scale, zp = act_scale.double(), get(a.act_zero_point).double()
    levels = torch.round(x.float() * (1 / act_scale)[:, None]).double()
    q = torch.clamp(levels + zp[:, None], a.act_qmin, a.act_qmax)
    w = get(a.w).double() * get(a.w_scale).double()[:, None]
    y = ((q - zp[:, None]) * scale[:, None]) @ w.T
    return y + get(a.bias).double() if a.bias is not None else y


def test_lowered_rotated_linear_matches_a_float64_computation(vim):
    """The converted graph multiplies the linear's input by R / s[:, None] (tagged), the lowered one keeps that
    product in front of vmq.int8_linear; the op's output equals the float64 computation of its levels."""
    _, gm = vim
    recipe = recipes.from_name("klt-sq-pts-w8a8")
    prepared = _calibrated(gm, recipe)
    quantizers = linear_quantizers(prepared)
    maps = {layer.name: act.input_map().detach().double() for layer, act, _ in quantizers.values()}
    smooths = {layer.name: act.smooth.detach().double() for layer, act, _ in quantizers.values()}
    rotations = {layer.name: act.rotation_matrix.double() for layer, act, _ in quantizers.values()}
    converted = convert_pt2e(prepared)
    n = len(quantized_linears(converted))
    tagged = [node for node in converted.graph.nodes if node.meta.get(ROTATION_META)]
    assert len(tagged) == n == 12
    assert not any(node.meta.get(SMOOTHING_META) for node in converted.graph.nodes)  # folded into the matrix
    for name in maps:  # R / s[:, None], computed here from the two factors
        assert torch.allclose(maps[name], rotations[name] / smooths[name][:, None], rtol=1e-6, atol=0)
    lowered = vmq_fx.lower(converted)
    targets = Counter(node.target for node in lowered.graph.nodes if node.op == "call_function")
    assert targets[torch.ops.vmq.int8_linear.default] == n
    assert targets[torch.ops.aten.matmul.default] == n
    captured = {}
    linears = [node for node in lowered.graph.nodes if node.target is torch.ops.vmq.int8_linear.default]
    for node in linears:
        node.meta["capture"] = True
    interp = torch.fx.Interpreter(lowered)
    run_node = interp.run_node

    def spy(node):
        out = run_node(node)
        if node.meta.get("capture"):
            captured[node.name] = (interp.env[Int8LinearArgs.from_node(node).x], out)
        return out

    interp.run_node = spy
    with torch.no_grad():
        interp.run(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3)))
    assert len(captured) == n
    for node in linears:
        x, out = captured[node.name]
        ref = _float64_linear(lowered, node, x)
        assert _rel(out.double(), ref) < 1e-5, node.name


@pytest.mark.fashion_mnist  # calibration_images reads the Fashion-MNIST training split
@pytest.mark.parametrize("rotation", ["hadamard", "klt"])
def test_rotation_lifts_w4a4_on_a_model_with_outlier_channels(rotation):
    """vim-fm-197's out_proj inputs have channels 10x their median (bench/results/activation_ranges.md); rotated,
    W4A4 per-token static comes much closer to FP32 (measured here: ~11 dB unrotated, 17-18 dB rotated)."""
    from vmq_fx.app.data import calibration_images
    from vmq_fx.models import load_reference

    model = load_reference("vim-fm-197")
    calib, x = calibration_images(64, seed=0), calibration_images(32, seed=5)
    gm = vmq_fx.export_model(model, calib[:2]).module()
    with torch.no_grad():
        ref = model(x)
    out = {}
    for r in ("none", rotation):
        prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.pts(4, 4, rotation=r)))
        vmq_fx.calibrate(prepared, calib, progress=False)
        with torch.no_grad():
            out[r] = _sqnr(vmq_fx.lower(convert_pt2e(prepared))(x), ref)
    assert out[rotation] > out["none"] + 3, out


def test_rotated_lowered_model_exports_to_onnx_and_saves(vim, tmp_path):
    fp, gm = vim
    prepared = _calibrated(gm, recipes.from_name("hadamard-pts-w8a8"))
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, noise = lowered(x), _rel(lowered(x), fp(x))
    res = vmq_fx.export_onnx(lowered, x[:2], tmp_path / "rot.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(res.path)).graph.node)
    assert ops["MatMulInteger"] == 12 and ops["MatMul"] >= 12
    sess = ort_session(res.path)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(out, ref) < 0.1 * noise  # a fraction of the model's own quantization noise (tests/test_onnx.py)
    vmq_fx.save_quantized(lowered, tmp_path / "rot.safetensors")
    loaded = vmq_fx.load_quantized(tmp_path / "rot.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


@pytest.mark.parametrize("rotation,op", [("klt", torch.ops.aten.matmul.default),
                                         ("hadamard", torch.ops.vmq.hadamard_transform.default)])
def test_rotation_composes_with_jlss(vim, rotation, op):
    """JLSS learns the smoothing scales and steps through the rotation (the matrix stays fixed; x_proj and dt_proj are
    not learned, as in PTQ4VM); the learned model lowers with one rotation (a matmul, or the Hadamard transform) per
    linear."""
    _, gm = vim
    prepared = _calibrated(gm, recipes.ptq4vm(4, 4, rotation=rotation), n=32)
    quantizers = linear_quantizers(prepared)
    before = {layer.name: (act.smooth.detach().clone(), act.rotation_matrix.clone())
              for layer, act, _ in quantizers.values()}
    data = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    vmq_fx.jlss(prepared, data, vmq_fx.JLSSConfig(steps=3, batch_size=8), progress=False)
    for layer, act, _ in quantizers.values():
        smooth, rotation = before[layer.name]
        assert torch.equal(act.rotation_matrix, rotation)
        assert torch.equal(act.smooth.detach(), smooth) == (layer.role in ("x_proj", "dt_proj")), layer.name
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    targets = Counter(node.target for node in lowered.graph.nodes if node.op == "call_function")
    assert targets[op] == targets[torch.ops.vmq.int8_linear.default] == 12


def test_hadamard_is_applied_by_the_transform_op_with_one_constant_per_odd_size(vim):
    """Vim-T-like sizes 96 = 3 x 32, 192 = 3 x 64, 6 = 3 x 2: the lowered graph rotates each linear's input with one
    vmq.hadamard_transform node (no matmul) and holds one Q per odd size, never a d x d matrix; a KLT rotation holds
    its d x d matrix per linear. bits_per_weight counts what is stored."""
    from vmq_fx.pt2e.diagnostics import bits_per_weight

    _, gm = vim
    lowered = {r: vmq_fx.lower(convert_pt2e(_calibrated(gm, recipes.pts(8, 8, rotation=r))))
               for r in ("none", "hadamard", "klt")}
    had = lowered["hadamard"]
    targets = Counter(node.target for node in had.graph.nodes if node.op == "call_function")
    assert targets[torch.ops.vmq.hadamard_transform.default] == targets[torch.ops.vmq.int8_linear.default] == 12
    assert targets[torch.ops.aten.matmul.default] == 0
    constants = sorted(name for name, _ in had.named_buffers() if name.startswith("vmq_hadamard"))
    assert constants == ["vmq_hadamard_odd_3"]
    assert not any(b.dim() == 2 and b.shape[0] == b.shape[1] and b.shape[0] > 3 for b in had.buffers())
    bits = {r: bits_per_weight(m) for r, m in lowered.items()}
    fp = vim[0]
    n = sum(fp.get_submodule(layer.name).weight.numel() for layer in quantized_linears(convert_pt2e(
        _calibrated(gm, recipes.pts(8, 8)))).values())
    assert bits["hadamard"] - bits["none"] == pytest.approx(32 * 3**2 / n, rel=1e-9)
    square = 2 * (96**2 + 2 * (192**2 + 6**2) + 192**2)  # one d x d matrix per linear
    assert bits["klt"] - bits["none"] == pytest.approx(32 * square / n, rel=1e-9)


def test_smoothing_before_a_hadamard_transform_folds_into_the_norm(vim):
    """SmoothQuant + Hadamard: each in_proj's input is the norm's output, so its division by s goes into the norm
    weight; the other linears keep theirs in front of the transform. Both lowerings compute the converted graph's
    numbers (float rounding apart, within a small share of the quantization noise)."""
    fp, gm = vim
    prepared = _calibrated(gm, recipes.smoothquant_pts(8, 8, rotation="hadamard"))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    out, divisions = {}, {}
    for fold in (False, True):
        lowered = vmq_fx.lower(convert_pt2e(copy.deepcopy(prepared)), fold_smoothing=fold)
        divisions[fold] = sum(1 for node in lowered.graph.nodes if node.meta.get(SMOOTHING_META))
        inputs = [node.args[0] for node in lowered.graph.nodes
                  if node.target is torch.ops.vmq.hadamard_transform.default]
        assert len(inputs) == 12
        with torch.no_grad():
            out[fold] = lowered(x)
    in_projs = 2  # one per block
    assert divisions == {False: 12, True: 12 - in_projs}
    with torch.no_grad():
        noise = _rel(out[False], fp(x))
    assert _rel(out[True], out[False]) < 0.05 * noise
