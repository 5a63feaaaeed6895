import copy
import operator
from collections import Counter

import pytest
from safetensors.torch import load_file
import torch
from torchao.quantization.pt2e.quantizer import ComposableQuantizer, Quantizer

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.pt2e.observers import NotCalibratedError
from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.pt2e.lowering.simplify import direct_attribute_reads
from vmq_fx.pt2e.quantizer import find_quantizable_linears

qd = torch.ops.quantized_decomposed


def _targets(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_finds_mixer_linears_by_structure(vim, vmamba):
    _, gm = vim
    names = [layer.name for _, layer in find_quantizable_linears(gm)]
    per_block = ["in_proj", "x_proj", "dt_proj", "x_proj_b", "dt_proj_b", "out_proj"]
    assert names == [f"layers.{i}.mixer.{r}" for i in range(2) for r in per_block]
    assert {layer.family for _, layer in find_quantizable_linears(gm)} == {"vim"}
    _, gm = vmamba
    layers = [layer for _, layer in find_quantizable_linears(gm)]
    assert {layer.family for layer in layers} == {"vmamba"}  # picks VMamba's alpha and JLSS defaults
    roles = Counter(layer.role for layer in layers)
    assert roles == {"in_proj": 2, "x_proj": 8, "dt_proj": 8, "out_proj": 2, "fc1": 2, "fc2": 2}
    assert not any("head" in l.name or "downsample" in l.name for l in layers)  # noqa: E741


def test_model_without_mamba_mixer_is_refused():
    gm = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),)).module()
    with pytest.raises(ValueError, match="no vmq.selective_scan node"):
        prepare_pt2e(gm, VisualMambaQuantizer())


@pytest.mark.parametrize("bits", [(1, 8), (8, 9), (4.0, 8)])
def test_bit_widths_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="must be an integer in 2..8"):
        recipes.ptq4vm(*bits)


def test_convert_before_calibration_is_refused(vim):
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    with pytest.raises(NotCalibratedError, match="run calibration"):
        convert_pt2e(prepared)


def test_calibration_with_other_token_count_is_refused(vim):
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    with pytest.raises(ValueError, match="token count is fixed at export"):
        vmq_fx.calibrate(prepared, torch.randn(4, 1, 32, 32), progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        vmq_fx.calibrate(prepared, [], progress=False)


@pytest.mark.parametrize("fixture", ["vim", "vmamba"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_prepare_calibrate_jlss_convert_lower(fixture, w_bits, request, tmp_path):
    torch.manual_seed(0)
    model, gm = request.getfixturevalue(fixture)
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(w_bits, 8)))
    n_linears = len(find_quantizable_linears(gm))
    calib = torch.randn(16, 1, 28, 28)
    vmq_fx.calibrate(prepared, calib, progress=False)
    report = vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=3, batch_size=8), progress=False)
    assert report.blocks == (2 if fixture == "vim" else 2)
    x = torch.randn(6, 1, 28, 28)
    fake_q = prepared(x)
    quantized = convert_pt2e(prepared)
    t = _targets(quantized)
    # One per-token quantize per quantized linear (axis 1), int weights folded to constants.
    assert t[qd.quantize_per_channel.default] == n_linears
    assert all(n.args[3] == 1 for n in quantized.graph.nodes if n.target is qd.quantize_per_channel.default)
    q_out = quantized(x)
    torch.testing.assert_close(q_out, fake_q, atol=1e-5 * fake_q.abs().max().item(), rtol=1e-4)
    lowered = vmq_fx.lower(quantized)
    t = _targets(lowered)
    assert t[torch.ops.vmq.int8_linear.default] == n_linears
    assert not any("quantize" in str(k) for k in t)
    assert t[torch.ops.aten.linear.default] == (1 if fixture == "vim" else 2)  # head (+ patch merging) stay float
    # The float weights of the quantized linears are gone: only integer copies remain.
    float_weights = {layer.name + ".weight" for _, layer in find_quantizable_linears(gm)}
    assert not float_weights & {n for n, _ in lowered.named_parameters()}
    # Every tensor the graph reads is an attribute of the root (one lookup per read, not one per step of a path).
    reads = [str(n.target) for n in lowered.graph.nodes if n.op == "get_attr"]
    assert reads and not any("." in r for r in reads) and not any("." in k for k in lowered.state_dict())
    # ... read by properties of the module's own class, not by Module.__getattr__ (direct_attribute_reads)
    assert all(isinstance(type(lowered).__dict__.get(r), property) for r in reads)
    low_out = lowered(x)
    # Integer accumulation is exact where the Q/DQ reference accumulates in float32: their ~1e-7 differences flip an
    # occasional rounding level downstream, hence a bound above float rounding but far below a wrong scale or layout.
    assert _rel(low_out, q_out) < 5e-3
    assert torch.equal(low_out.argmax(-1), q_out.argmax(-1))
    # Against the float model on random images: 0.02-0.09 at W8A8 and 0.07-0.14 at W4A8 on these random models (the
    # Vim one's weights depend on what drew from the global generator first); a wrong step size or zero point gives
    # errors of order 1.
    assert _rel(q_out, model(x)) < (0.15 if w_bits == 8 else 0.25)
    # Saved and loaded: the same numbers; 4-bit weights run as int8 and are stored two per byte.
    path = tmp_path / "q.safetensors"
    vmq_fx.save_quantized(lowered, path, model.config)
    weights = [Int8LinearArgs.from_node(n).w.target for n in lowered.graph.nodes
               if n.target is torch.ops.vmq.int8_linear.default]
    stored = load_file(path)
    for name in weights:
        runtime = lowered.get_buffer(name)
        assert runtime.dtype == torch.int8
        want = (runtime.shape[0], -(-runtime.shape[1] // 2)) if w_bits == 4 else tuple(runtime.shape)
        assert tuple(stored[name].shape) == want and stored[name].dtype == (torch.uint8 if w_bits == 4 else torch.int8)
    loaded = vmq_fx.load_quantized(path)
    assert torch.equal(loaded(x), low_out)
    assert sorted(str(n.target) for n in loaded.graph.nodes if n.op == "get_attr") == sorted(reads)
    assert all(isinstance(type(loaded).__dict__.get(r), property) for r in reads)


def test_direct_attribute_reads_keep_the_module_semantics():
    """The properties that read a lowered graph's tensors follow the module: replaced, reloaded, converted, deleted and
    re-registered tensors, plain attributes of the same name; other graph modules are untouched."""
    root = torch.nn.Module()
    root.register_buffer("b", torch.tensor([1.0, 2.0]))
    root.p = torch.nn.Parameter(torch.tensor([10.0, 20.0]), requires_grad=False)
    graph = torch.fx.Graph()
    x_node = graph.placeholder("x")
    scaled = graph.call_function(torch.mul, (x_node, graph.get_attr("b")))
    graph.output(graph.call_function(torch.add, (scaled, graph.get_attr("p"))))
    other = torch.fx.GraphModule(copy.deepcopy(root), graph)
    gm = direct_attribute_reads(torch.fx.GraphModule(root, graph))
    assert isinstance(type(gm).__dict__["b"], property) and isinstance(type(gm).__dict__["p"], property)
    assert "b" not in type(other).__dict__
    x = torch.tensor([3.0, 4.0])
    assert gm(x).tolist() == [13.0, 28.0]  # 3 * 1 + 10, 4 * 2 + 20
    gm.load_state_dict({"b": torch.tensor([0.5, 0.5]), "p": torch.tensor([1.0, 1.0])})
    assert gm(x).tolist() == [2.5, 3.0]
    gm.b = torch.tensor([2.0, 2.0])  # a registered buffer replaced
    assert gm(x).tolist() == [7.0, 9.0] and set(gm.state_dict()) == {"b", "p"}
    assert copy.deepcopy(gm)(x).tolist() == [7.0, 9.0]
    assert gm.to(torch.float64)(x.double()).dtype == torch.float64 and gm.p.dtype == torch.float64
    del gm.b
    assert not hasattr(gm, "b") and set(gm.state_dict()) == {"p"}
    gm.b = "plain"  # not a tensor: a plain attribute of that name
    assert gm.b == "plain" and set(gm.state_dict()) == {"p"}
    del gm.b
    with pytest.raises(AttributeError):
        del gm.b
    gm.register_buffer("b", torch.ones(2, dtype=torch.float64))
    assert gm(x.double()).tolist() == [4.0, 5.0] and other(x).tolist() == [13.0, 28.0]


def test_smoothing_folds_into_norm_exactly(vim):
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    quantized = convert_pt2e(prepared)
    x = torch.randn(4, 1, 28, 28)
    folded = vmq_fx.lower(copy.deepcopy(quantized), fold_smoothing=True)
    fused = vmq_fx.lower(copy.deepcopy(quantized), fold_smoothing=False)
    inv = lambda gm: sum(1 for n in gm.graph.nodes  # noqa: E731
                         if n.target is torch.ops.vmq.int8_linear.default and Int8LinearArgs.from_node(n).smooth is not None)
    assert inv(fused) == 12 and inv(folded) == 10  # both in_proj smoothings went into the RMSNorm weights
    assert not any(n.target is torch.ops.aten.div.Tensor and "smooth" in str(n.args[1]) for n in folded.graph.nodes)
    # Folded and unfolded agree to float rounding (a rare level flip moves a logit by one step at most).
    torch.testing.assert_close(folded(x), fused(x), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("recipe, folded", [(recipes.smoothquant_pts(8, 8), True),  # into out_proj's smoothing
                                            (recipes.per_tensor_static(8, 8), True),  # into its act / weight scales
                                            (recipes.per_token_dynamic(8, 8), False)])  # range-derived: left alone
def test_the_average_of_the_two_scans_folds_into_out_proj_bit_exactly(vim, recipe, folded):
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipe))
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    quantized = convert_pt2e(prepared)
    on = vmq_fx.lower(copy.deepcopy(quantized))
    off = vmq_fx.lower(copy.deepcopy(quantized), fold_power_of_two=False)

    def halvings(gm):  # Vim's (y_fwd + y_bwd) / 2, one per block
        return sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.div.Tensor and n.args[1] == 2)

    assert halvings(off) == 2 and halvings(on) == (0 if folded else 2)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(on(x), off(x))


def test_per_tensor_baseline_graph(vim):
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.per_tensor_static(8, 8)))
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    quantized = convert_pt2e(prepared)
    t = _targets(quantized)
    assert t[qd.quantize_per_tensor.default] == 12 and t[qd.quantize_per_channel.default] == 0
    x = torch.randn(4, 1, 28, 28)
    assert _rel(vmq_fx.lower(quantized)(x), quantized(x)) < 5e-3


class _OtherQuantizer(Quantizer):
    """Another quantizer: per-tensor min-max int8 activations and per-channel int8 weights of the linears whose
    weight name ends with one of ``suffixes`` (as a backend's quantizer would annotate its partitions)."""

    def __init__(self, *suffixes):
        super().__init__()
        self.suffixes = suffixes

    def annotate(self, model):
        from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

        self.act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                                    observer_or_fake_quant_ctr=MinMaxObserver)
        self.weight = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, ch_axis=0,
                                       qscheme=torch.per_channel_symmetric,
                                       observer_or_fake_quant_ctr=PerChannelMinMaxObserver)
        for n in model.graph.nodes:
            if n.target is torch.ops.aten.linear.default and str(n.args[1].target).endswith(self.suffixes):
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={n.args[0]: self.act, n.args[1]: self.weight}, _annotated=True)
        return model

    def validate(self, model):
        pass


def test_composes_with_another_quantizer_that_claims_out_proj(vim, tmp_path):
    """Another quantizer annotates out_proj (and the head) first; ours takes the rest and leaves those alone through
    calibration, JLSS, convert, lowering and ONNX."""
    other = _OtherQuantizer("out_proj.weight", "head.weight")
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), ComposableQuantizer([other, VisualMambaQuantizer(
        recipes.ptq4vm(8, 8))]))
    out_proj = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.linear.default
                and str(n.args[1].args[0].target if n.args[1].op == "call_module" else n.args[1].target).endswith(
                    "out_proj.weight")]
    assert len(out_proj) == 2  # one per block
    for n in out_proj:  # the other quantizer's specs, not ours, and not counted as ours
        assert n.meta["quantization_annotation"].input_qspec_map[n.args[0].args[0]] is other.act
        assert "vmq_linear" not in n.meta
    calib = torch.randn(16, 1, 28, 28)
    vmq_fx.calibrate(prepared, calib, progress=False)
    report = vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=2, batch_size=8), progress=False)
    assert report.blocks == 2
    quantized = convert_pt2e(prepared)
    t = _targets(quantized)
    assert t[qd.quantize_per_channel.default] == 10  # ours: 6 linears per block but out_proj
    assert t[qd.quantize_per_tensor.default] == 3  # the other's: 2 out_proj + head
    lowered = vmq_fx.lower(quantized)
    t = _targets(lowered)
    assert t[torch.ops.vmq.int8_linear.default] == 10 and t[qd.quantize_per_tensor.default] == 3
    x = torch.randn(4, 1, 28, 28)
    assert _rel(lowered(x), quantized(x)) < 5e-3
    res = vmq_fx.export_onnx(lowered, x[:2], tmp_path / "composed.onnx")
    assert res.op_counts["MatMulInteger"] == 10 and res.op_counts["QuantizeLinear"] >= 13


def _quantizer_params(prepared):
    """{(layer, kind): tensor copy} of every step size and smoothing scale."""
    out = {}
    for layer, act, weight in vmq_fx.pt2e.utils.linear_quantizers(prepared).values():
        out[(layer.name, "act")] = act.scale.detach().clone()
        out[(layer.name, "weight")] = weight.scale.detach().clone()
        out[(layer.name, "smooth")] = act.smooth.detach().clone()
    return out


def test_jlss_lowers_the_block_loss_and_learns_only_what_it_should(vim):
    model, gm = vim
    calib = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(4, 4)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    before = _quantizer_params(prepared)
    still = vmq_fx.jlss(copy.deepcopy(prepared), calib, vmq_fx.JLSSConfig(steps=0), progress=False)
    assert still.loss_after == still.loss_before  # no step: nothing moves
    report = vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=20), progress=False)
    assert report.loss_before[0] == still.loss_before[0]  # later blocks start from the learned earlier ones
    assert all(a < b for a, b in zip(report.loss_after, report.loss_before)), report
    after = _quantizer_params(prepared)
    for (name, kind), value in before.items():
        moved = not torch.equal(value, after[(name, kind)])
        # PTQ4VM learns in_proj / out_proj (step sizes and smoothing); x_proj and dt_proj keep their initial values
        assert moved == (name.endswith("in_proj") or name.endswith("out_proj")), (name, kind)


def test_block_runner_views_a_tensor_of_images_and_takes_batches_as_given(vim):
    """The block-wise methods hold the images they learn on: a tensor is the caller's (no second copy of the set),
    an iterable's batches are concatenated in order, and empty data is one clear error."""
    from vmq_fx.pt2e.blockwise import BlockRunner

    _, gm = vim
    calib = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    runner = BlockRunner(prepared, calib)
    assert runner.images.data_ptr() == calib.data_ptr() and runner.total == 8
    batches = BlockRunner(prepared, [(calib[:3], 0), (calib[3:], 1)])
    assert torch.equal(batches.images, calib) and batches.images.data_ptr() != calib.data_ptr()
    with pytest.raises(ValueError, match="calibration data is empty"):
        BlockRunner(prepared, calib[:0])


def test_a_dataset_of_images_is_read_only_where_this_process_computes(vim, monkeypatch):
    """A map-style dataset of (image, label) pairs calibrates as the same images in a tensor do (the same batches, so
    the same statistics, exactly) and the block-wise methods hold the same images; each process reads only its
    share: its batches in calibration, its run of images in the block-wise methods (here process 1 of 2, with the
    group mocked)."""
    from distributed_calibration import RecordingImages

    from vmq_fx import distributed
    from vmq_fx.pt2e.blockwise import BlockRunner
    from vmq_fx.pt2e.observers import PerTokenStaticFakeQuantize

    _, gm = vim
    calib = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    stats = []
    for data in (calib, RecordingImages(calib)):
        prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.smoothquant_pts(8, 8)))
        vmq_fx.calibrate(prepared, data, batch_size=4, progress=False)
        stats.append([(m.min_val, m.max_val, m.smooth.detach(), *m.calculate_qparams())
                      for m in prepared.modules() if isinstance(m, PerTokenStaticFakeQuantize)])
    assert len(stats[0]) == 12 and data.read == list(range(10))  # read once for both passes
    for a, b in zip(*stats):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(BlockRunner(prepared, RecordingImages(calib)).images, calib)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    data = RecordingImages(calib)
    runner = BlockRunner(prepared, data)
    assert data.read == list(range(5, 10)) and runner.total == 10 and torch.equal(runner.images, calib[5:])
    data = RecordingImages(calib)
    # the mocked group sums nothing: this process calibrates on its batches alone
    vmq_fx.calibrate(prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.smoothquant_pts(8, 8))), data,
                     batch_size=4, progress=False)
    assert data.read == list(range(4, 10))  # batches [0, 4) [4, 8) [8, 10): process 1 runs the last two


def test_jlss_targets_the_mixer_output_or_the_residual_stream(vim):
    from vmq_fx.pt2e.blockwise import BlockRunner

    model, gm = vim
    calib = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(4, 4)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    runner = BlockRunner(prepared, calib)
    # Independent reference: the eager float model's blocks (mixer output and the residual each passes on), against
    # the runner's captures block after block (each walked on from the previous one's inputs).
    eager = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: eager.update({k: o})) for k, layer in
             enumerate(model.layers)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    assert len(runner.blocks) == len(eager) == 2
    for k in range(len(runner.blocks)):
        _, fp_out = runner.capture(k, fake_quant=False)
        own = [t for t, o in zip(fp_out, runner._own[k]) if t is not None and o]
        passed = [t for t, o in zip(fp_out, runner._own[k]) if t is not None and not o]
        assert len(own) == 1 and len(passed) == 1
        torch.testing.assert_close(own[0], eager[k][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(passed[0], eager[k][1], atol=1e-4, rtol=1e-4)
    seen = {"mixer": eager[1][0], "residual": eager[1][1]}
    q_in, _ = runner.capture(1, fake_quant=True)
    with torch.no_grad():
        q_out = [t for t in runner._submods[3](*[operator.attrgetter(ref)(runner.split) if kind == "attr"
                                                 else q_in[ref] for kind, ref in runner._specs[1]])]
        q_own = [q for q, o in zip(q_out, runner._own[1]) if o][0]
        q_stream = sum(q for q, t in zip(q_out, fp_out) if t is not None)

        def one_minus_cos(a, b):
            a, b = a.double(), b.double()
            return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()

        assert runner.loss(1, q_in, fp_out).item() == pytest.approx(one_minus_cos(seen["mixer"], q_own), rel=1e-3)
        stream = seen["mixer"] + seen["residual"]
        assert runner.loss(1, q_in, fp_out, target="stream").item() == pytest.approx(
            one_minus_cos(stream, q_stream), rel=1e-3)


def test_jlss_in_the_log_domain_changes_step_sizes_by_relative_amounts(vim):
    calib = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.ptq4vm(4, 4)))
    vmq_fx.calibrate(prepared, calib, progress=False)
    before = _quantizer_params(prepared)
    report = vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=20, step_domain="log"), progress=False)
    assert all(a < b for a, b in zip(report.loss_after, report.loss_before)), report
    after = _quantizer_params(prepared)
    moved = 0
    for key, value in before.items():
        # Adam moves log(p) by at most about lr (1e-3) per step: 20 steps change p by at most ~2 %, whatever its
        # size (in the linear domain the same learning rate moves a step size of 0.002 by 50 % per step).
        ratio = (after[key] / value).log().abs().max().item()
        assert ratio <= 20 * 1e-3 * 1.05, (key, ratio)
        moved += ratio > 0
    assert moved > 0


def test_mixed_precision_per_role_and_module_name(vim):
    quantizer = (VisualMambaQuantizer(recipes.ptq4vm(4, 4)).set_role("dt_proj", recipes.ptq4vm(8, 8))
                 .set_module_name("layers.*.mixer.x_proj_b", None))
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), quantizer)
    layers = {layer.name: layer for layer in vmq_fx.pt2e.quantizer.quantized_linears(prepared).values()}
    assert not any(name.endswith("x_proj_b") for name in layers)  # left in float
    assert {(layers[n].recipe.w_bits, layers[n].recipe.a_bits) for n in layers if layers[n].role == "dt_proj"} == {(8, 8)}
    assert {(layers[n].recipe.w_bits, layers[n].recipe.a_bits) for n in layers if layers[n].role != "dt_proj"} == {(4, 4)}
    vmq_fx.calibrate(prepared, torch.randn(16, 1, 28, 28), progress=False)
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    bits = sorted(Int8LinearArgs.from_node(n).w_bits for n in lowered.graph.nodes
                  if n.target is torch.ops.vmq.int8_linear.default)
    assert bits == [4] * 6 + [8] * 4  # per block: in_proj, x_proj, out_proj at 4; dt_proj, dt_proj_b at 8
    assert sum(n.target is torch.ops.aten.linear.default for n in lowered.graph.nodes) == 2 + 1  # x_proj_b x2, head
    with pytest.raises(ValueError, match="unknown role"):
        VisualMambaQuantizer().set_role("gate_proj", None)
    mixed = VisualMambaQuantizer(recipes.ptq4vm(8, 8)).set_role("fc1", recipes.vimvq(2))
    with pytest.raises(ValueError, match=r"mixes recipe families \(PTQ4VMRecipe, VQRecipe\)"):
        prepare_pt2e(copy.deepcopy(vim[1]), mixed)


def test_per_token_dynamic_baseline(vim, tmp_path):
    torch.manual_seed(0)
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), VisualMambaQuantizer(recipes.per_token_dynamic(8, 6)))
    vmq_fx.calibrate(prepared, torch.randn(8, 1, 28, 28), progress=False)  # weights only: activations need none
    x = torch.randn(4, 1, 28, 28)
    fake_q = prepared(x)
    quantized = convert_pt2e(prepared)
    t = _targets(quantized)
    assert t[torch.ops.torchao.choose_qparams_affine] == 12 and t[torch.ops.torchao.quantize_affine] == 12
    torch.testing.assert_close(quantized(x), fake_q)
    reference = quantized(x)
    lowered = vmq_fx.lower(quantized)  # each row's parameters are computed by the op at run time
    ops = [n for n in lowered.graph.nodes if n.op == "call_function"]
    int8 = [Int8LinearArgs.from_node(n) for n in ops if n.target is torch.ops.vmq.int8_linear.default]
    assert len(int8) == 12 and all(a.act_scale is None and a.act_zero_point is None for a in int8)
    assert not [n for n in ops if "affine" in str(n.target)]  # no choose / quantize / dequantize left
    # the same levels as the Q/DQ graph; products in int32 instead of float (a level flips where float rounding
    # puts a later activation on a rounding boundary)
    with torch.no_grad():
        out = lowered(x)
        assert float((out - reference).norm() / reference.norm()) < 1e-3
        vmq_fx.save_quantized(lowered, tmp_path / "dynamic.safetensors")
        assert torch.equal(vmq_fx.load_quantized(tmp_path / "dynamic.safetensors")(x), out)
    res = vmq_fx.export_onnx(lowered, x[:2], tmp_path / "dynamic.onnx")
    assert "QuantizeLinear" not in res.op_counts and res.op_counts["ReduceMin"] == 12  # the ranges, in the graph
    ort_out = vmq_fx.export.ort_session(res.path).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(ort_out), out, rtol=1e-4, atol=1e-4 * float(out.abs().max()))
    with pytest.raises(ValueError, match="smoothing is initialized from per-token static"):
        vmq_fx.PTQ4VMRecipe(act_granularity="per_token_dynamic", smooth=True)


@pytest.mark.parametrize("family", ["ptq4vm", "vimvq"])
def test_the_same_seed_gives_the_same_model(vim, family):
    """JLSS's and ViM-VQ's batches and initializations come from their seeds, and their gradients are summed in a
    fixed order: two runs write the same tensors (the README's reproducibility claim)."""
    calib = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    recipe, config = ((recipes.ptq4vm(8, 8), vmq_fx.JLSSConfig(steps=3, batch_size=8)) if family == "ptq4vm" else
                      (recipes.vimvq(2), vmq_fx.VQConfig(steps=3, batch_size=8)))
    runs = [vmq_fx.quantize(vim[0], recipe, calib, config=config, progress=False).lowered.state_dict()
            for _ in range(2)]
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_recipe_names_round_trip_and_jlss_flag():
    for name in ("ptq4vm-w4a8", "sq-pts-w8a8", "pts-w8a8", "per-tensor-w8a8", "per-token-dynamic-w4a4", "vimvq-2bit",
                 "vq-convex-3bit", "vq-kmeans-1bit", "ptq4vm-w4a4[alpha=0.6]", "vimvq-1bit[n=2]"):
        assert recipes.from_name(name).name == name
    # every recipe, not only the named ones, has a name that gives it back
    for recipe in (vmq_fx.PTQ4VMRecipe(smooth=False), vmq_fx.PTQ4VMRecipe(jlss=False, num_candidates=50),
                   recipes.vimvq(None, d=3, k=256), recipes.smoothquant_pts(6, 6, p=2.0),
                   recipes.vq_convex(2, codebook="layer", n=8)):
        assert recipes.from_name(recipe.name) == recipe, recipe.name
    assert recipes.ptq4vm(8, 8).jlss and not recipes.smoothquant_pts(8, 8).jlss
    with pytest.raises(ValueError, match="unknown recipe 'ptq4vm-3bit'"):
        recipes.from_name("ptq4vm-3bit")
    with pytest.raises(ValueError, match="JLSS learns per-token static step sizes"):
        vmq_fx.PTQ4VMRecipe(act_granularity="per_tensor_static", smooth=False)


def test_two_composed_visual_mamba_quantizers_each_keep_their_settings(vim):
    """The first quantizer claims in_proj with PTQ4VM W4A8 (JLSS), the second takes the rest with SmoothQuant + PTS
    W8A8 (no JLSS). Each layer keeps its own recipe on its node, nothing is kept on the graph module for one to
    overwrite, and JLSS learns the first's layers only."""
    first = VisualMambaQuantizer().set_global(None).set_role("in_proj", recipes.ptq4vm(4, 8))
    second = VisualMambaQuantizer(recipes.smoothquant_pts(8, 8))
    prepared = prepare_pt2e(copy.deepcopy(vim[1]), ComposableQuantizer([first, second]))
    assert "vmq_quantizer" not in prepared.meta
    layers = vmq_fx.pt2e.quantizer.quantized_linears(prepared).values()
    assert {(layer.role, layer.recipe.name) for layer in layers} == {
        ("in_proj", "ptq4vm-w4a8"), ("x_proj", "sq-pts-w8a8"), ("dt_proj", "sq-pts-w8a8"), ("out_proj", "sq-pts-w8a8")}
    calib = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    vmq_fx.calibrate(prepared, calib, progress=False)
    before = _quantizer_params(prepared)
    vmq_fx.jlss(prepared, calib, vmq_fx.JLSSConfig(steps=3), progress=False)
    after = _quantizer_params(prepared)
    for (name, kind), value in before.items():
        assert (not torch.equal(value, after[(name, kind)])) == name.endswith("in_proj"), (name, kind)
    lowered = vmq_fx.lower(convert_pt2e(prepared))
    bits = Counter(Int8LinearArgs.from_node(n).w_bits for n in lowered.graph.nodes
                   if n.target is torch.ops.vmq.int8_linear.default)
    assert bits == {4: 2, 8: 10}  # in_proj at 4 bits, the other 5 linears of each of the 2 blocks at 8


def test_the_config_must_fit_the_recipe_family(vim):
    model = vim[0]
    calib = torch.randn(8, 1, 28, 28)
    with pytest.raises(TypeError, match="ptq4vm-w8a8 is optimized with a JLSSConfig, got a VQConfig"):
        vmq_fx.quantize(model, recipes.ptq4vm(8, 8), calib, vmq_fx.VQConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="sq-pts-w8a8 has no optimization step; a config"):
        vmq_fx.quantize(model, recipes.smoothquant_pts(8, 8), calib, vmq_fx.JLSSConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="JLSSConfig: target must be 'mixer' or 'stream'"):
        vmq_fx.JLSSConfig(target="block")
    with pytest.raises(ValueError, match=r"PTQ4VMRecipe has no field 'steps' \(a setting of the optimization: "
                                         r"JLSSConfig\)"):
        recipes.from_name("ptq4vm-w4a4[steps=50]")
    from vmq_fx.pt2e.flow import method_from_name

    recipe, config = method_from_name("ptq4vm-w4a4[alpha=0.6,target=mixer,steps=50]")
    assert recipe == recipes.ptq4vm(4, 4, alpha=0.6) and config == vmq_fx.JLSSConfig(steps=50, target="mixer")
    with pytest.raises(ValueError, match="neither PTQ4VMRecipe nor JLSSConfig has a field 'lr'"):
        method_from_name("ptq4vm-w4a4[lr=0.1]")
