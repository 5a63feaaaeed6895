"""Outlier channels kept at 8 bits (PTQ4VMRecipe.outlier_fraction, OuroMamba-style): which channels calibration
picks, the converted and lowered graphs, their numbers, ONNX, the bits they cost."""
import copy
import math
from collections import Counter

import onnx
import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.export import ort_session
from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.pt2e.diagnostics import bits_per_activation
from vmq_fx.pt2e.observers.fake_quantize import OUTLIER_META
from vmq_fx.pt2e.quantizer import quantized_linears
from vmq_fx.pt2e.utils import linear_quantizers


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _images(n, seed):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _calibrated(gm, recipe, images):
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipe))
    vmq_fx.calibrate(prepared, images, progress=False)
    return prepared


def test_recipe_checks():
    assert recipes.from_name("outlier-pts-w4a4").outlier_fraction == 1 / 32
    r = recipes.from_name("outlier-sq-pts-w4a4[outlier_fraction=0.0625]")
    assert r.smooth and r.outlier_fraction == 0.0625 and recipes.from_name(r.name) == r
    with pytest.raises(ValueError, match=r"outlier_fraction must be in \[0, 0.5\)"):
        recipes.pts(4, 4, outlier_fraction=0.5)
    with pytest.raises(ValueError, match="without a rotation"):
        recipes.pts(4, 4, outlier_fraction=0.1, rotation="hadamard")
    with pytest.raises(ValueError, match="outlier channels need per-token static"):
        recipes.per_token_dynamic(4, 4, outlier_fraction=0.1)


def test_calibration_picks_the_channels_with_the_largest_inputs(vim):
    """The mask of each linear holds ceil(fraction x K) channels: those whose max|x| over the calibration images is
    largest, found here with forward hooks on the eager model."""
    fp, gm = vim
    images = _images(16, 1)
    prepared = _calibrated(gm, recipes.pts(4, 4, outlier_fraction=0.1), images)
    seen = {}
    hooks = [fp.get_submodule(layer.name).register_forward_hook(
        lambda m, a, o, name=layer.name: seen.__setitem__(name, a[0].detach().abs().amax((0, 1))))
        for layer, _, _ in linear_quantizers(prepared).values()]
    with torch.no_grad():
        fp(images)
    for h in hooks:
        h.remove()
    checked = 0
    for layer, act, _ in linear_quantizers(prepared).values():
        if layer.name not in seen:  # dt_proj's weight is used inside the mixer's forward, not called as a module
            continue
        checked += 1
        k = math.ceil(0.1 * seen[layer.name].numel())
        assert act.outlier_mask.sum() == k
        assert set(act.outlier_mask.nonzero().flatten().tolist()) == set(seen[layer.name].topk(k).indices.tolist())
        # the other channels' ranges leave the outliers out: every token's range is within the non-outlier maxima
        rest = seen[layer.name][~act.outlier_mask].max()
        assert act.max_val.max() <= rest + 1e-6 and act.outliers.max_val.max() > rest
    assert checked == 8  # in_proj, x_proj, x_proj_b, out_proj of both blocks


@pytest.mark.parametrize("recipe", ["outlier-pts-w4a4", "outlier-sq-pts-w8a8"])
def test_lowered_outlier_linears_match_the_converted_graph(vim, recipe, tmp_path):
    """Two vmq.int8_linear per linear (all channels, and the outlier channels picked by index_select at 8 bits) give
    the converted (Q/DQ) graph's numbers: the difference is a small fraction of the model's own quantization error
    (a dropped or doubled outlier part is as large as that error or larger). ONNX and a saved file give the same."""
    fp, gm = vim
    converted = convert_pt2e(_calibrated(gm, recipes.from_name(recipe), _images(16, 1)))
    n = len(quantized_linears(converted))
    assert sum(bool(node.meta.get(OUTLIER_META)) for node in converted.graph.nodes) == n == 12
    lowered = vmq_fx.lower(copy.deepcopy(converted))
    targets = Counter(node.target for node in lowered.graph.nodes if node.op == "call_function")
    assert targets[torch.ops.vmq.int8_linear.default] == 2 * n
    assert targets[torch.ops.aten.index_select.default] == n
    parts = [node for node in lowered.graph.nodes if node.meta.get(OUTLIER_META)]
    assert len(parts) == n and all(Int8LinearArgs.from_node(node).act_qmax == 255 for node in parts)
    x = _images(8, 4)
    with torch.no_grad():
        ref, out, float_model = converted(x), lowered(x), fp(x)
    noise = _rel(ref, float_model)
    assert _rel(out, ref) < 0.1 * noise, (_rel(out, ref), noise)
    res = vmq_fx.export_onnx(lowered, x[:2], tmp_path / "outliers.onnx")
    ops = Counter(node.op_type for node in onnx.load(str(res.path)).graph.node)
    assert ops["MatMulInteger"] == 2 * n and ops["Gather"] >= n
    sess = ort_session(res.path)
    onnx_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(onnx_out, out) < 0.1 * noise
    vmq_fx.save_quantized(lowered, tmp_path / "outliers.safetensors")
    with torch.no_grad():
        assert torch.equal(vmq_fx.load_quantized(tmp_path / "outliers.safetensors")(x), out)


def test_bits_per_activation_counts_the_outlier_channels(vim):
    _, gm = vim
    prepared = _calibrated(gm, recipes.pts(4, 4, outlier_fraction=0.1), _images(16, 1))
    expected_bits = expected_channels = 0
    for _, act, _ in linear_quantizers(prepared).values():
        big, k = act.outlier_mask.numel(), int(act.outlier_mask.sum())
        expected_bits += 4 * big + 8 * k
        expected_channels += big
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    assert bits_per_activation(lowered) == pytest.approx(expected_bits / expected_channels, rel=1e-12)
    plain = vmq_fx.lower(convert_pt2e(_calibrated(gm, recipes.pts(4, 4), _images(16, 1))))
    assert bits_per_activation(plain) == 4


def test_outlier_steps_are_learned_by_jlss(vim):
    _, gm = vim
    prepared = _calibrated(gm, recipes.ptq4vm(4, 4, outlier_fraction=0.1), _images(32, 1))
    quantizers = linear_quantizers(prepared)
    before = {layer.name: act.outliers.scale.detach().clone() for layer, act, _ in quantizers.values()}
    vmq_fx.jlss(prepared, _images(32, 2), vmq_fx.JLSSConfig(steps=3, batch_size=8), progress=False)
    for layer, act, _ in quantizers.values():
        learned = layer.role not in ("x_proj", "dt_proj")  # PTQ4VM learns in_proj's and out_proj's
        assert torch.equal(act.outliers.scale.detach(), before[layer.name]) != learned, layer.name
