import copy
import os
import subprocess
import sys
from collections import Counter

import onnx
import pytest
import torch

import vmq_fx
from vmq_fx import VisualMambaQuantizer, convert_pt2e, prepare_pt2e, recipes
from vmq_fx.app.data import calibration_images, fashion_mnist, normalize
from vmq_fx.export import OnnxExportError, ort_session
from vmq_fx.models import create_model, load_reference
from vmq_fx.ops.int8_linear import prepare_weight

REL_BOUND = 1e-4  # FP logits, onnxruntime vs torch: float reassociation (Scan body, exp, reductions) only
# Quantized models: an upstream float difference of ~1e-7 moves the few activations that sit on a rounding boundary
# to the neighbouring level, so the difference scales with the model's own quantization noise (its error against the
# FP model); a wrong translation (scale, zero point, packing) makes errors as large as that noise or larger.
QUANT_NOISE_FRACTION = 0.1


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path, x):
    sess = ort_session(path)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check(model, path, x, bound=REL_BOUND, fp_model=None):
    """ONNX vs torch; with ``fp_model``, the bound is a fraction of ``model``'s quantization error against it."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ref = model(x)
    if fp_model is not None:
        bound = QUANT_NOISE_FRACTION * _rel(ref, fp_model(x))
    out = _run(path, x)
    assert out.shape == ref.shape
    rel = _rel(out, ref)
    assert rel < bound, rel
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    return rel


@pytest.fixture(scope="module")
def test_batch():
    images, _ = fashion_mnist("test")
    return normalize(images[:64])


_REFS: dict = {}


def _ref(name):
    if name not in _REFS:
        model = load_reference(name)
        _REFS[name] = model, vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()
    return _REFS[name]


REFERENCES = ["vim-fm-tiny", "vmamba-fm-tiny"]


@pytest.fixture(scope="module")
def fp_onnx(tmp_path_factory, test_batch):
    """The FP reference model's standard-op ONNX file, exported once per module (13 s for vmamba-fm-tiny)."""
    files = {}

    def export(name):
        if name not in files:
            files[name] = vmq_fx.export_onnx(_ref(name)[0], test_batch[:2], tmp_path_factory.mktemp(name) / "fp.onnx")
        return files[name]

    return export


@pytest.mark.fashion_mnist  # the test_batch fixture reads the Fashion-MNIST test split
@pytest.mark.parametrize("name", REFERENCES)
def test_fp_reference_models_export_with_one_scan_per_direction(name, test_batch, fp_onnx):
    model, gm = _ref(name)
    res = fp_onnx(name)
    ops = _ops(res.path)
    scans = sum(n.target is torch.ops.vmq.selective_scan.default for n in gm.graph.nodes)
    assert ops["Scan"] == scans and ops["Loop"] == 0  # one loop per scan (size vs L: the next test)
    _check(model, res.path, test_batch)


def test_scan_does_not_grow_with_sequence_length(tmp_path):
    sizes = []
    for img in (28, 56):  # 17 vs 65 tokens
        torch.manual_seed(0)
        model = create_model("vim_fm_tiny", depth=1, img_size=img).eval()
        res = vmq_fx.export_onnx(model, torch.randn(2, 1, img, img), tmp_path / f"v{img}.onnx")
        sizes.append((sum(_ops(res.path).values()), res.bytes - 4 * (img // 7) ** 2 * 96))  # minus pos_embed
        _check(model, res.path, torch.randn(3, 1, img, img))
    assert sizes[0][0] == sizes[1][0]
    assert abs(sizes[0][1] - sizes[1][1]) < 2048


class _Splits(torch.nn.Module):
    def forward(self, x):  # x [b, 10, 7]
        a, b, c = torch.split(x, [2, 5, 3], dim=1)  # aten.split_with_sizes
        d, e = torch.chunk(x, 2, dim=-1)  # aten.chunk: 4 + 3
        f, g, h, _ = x.split(3, dim=1)  # aten.split.Tensor: 3 + 3 + 3 + 1
        return (a.sum(1) * 2 + b.sum(1) - c.sum(1), d * 3 - e.sum(-1, keepdim=True), f + 2 * g - h)


def test_splits_export_as_split_nodes_without_sequences(tmp_path):
    model, x = _Splits(), torch.randn(2, 10, 7)
    ep = torch.export.export(model, (x,))
    targets = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert targets["aten.split_with_sizes.default"] == 1 and targets["aten.chunk.default"] == 1
    assert targets["aten.split.Tensor"] == 1
    res = vmq_fx.export_onnx(model, x, tmp_path / "splits.onnx", config=None)
    ops = _ops(res.path)
    assert ops["Split"] == 3 and ops["SplitToSequence"] == 0 and ops["SequenceAt"] == 0
    sess = ort_session(res.path)
    y = torch.randn(3, 10, 7)
    outs = sess.run(None, {sess.get_inputs()[0].name: y.numpy()})
    for out, ref in zip(outs, model(y), strict=True):
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-6, atol=1e-6)


class _Int8Linear(torch.nn.Module):
    def __init__(self, k, n, w_bits, a_bits, smooth, dynamic=False):
        super().__init__()
        g = torch.Generator().manual_seed(k + n + w_bits)
        qmax = 2 ** (w_bits - 1) - 1
        w = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int8)
        w_stored, w_sum = prepare_weight(w)
        if w_bits <= 4:
            w_stored = vmq_fx.ops.pack_int4(w_stored)  # the stored form, unpacked in the ONNX graph
        self.register_buffer("w", w_stored)
        self.register_buffer("w_sum", w_sum)
        self.register_buffer("w_scale", torch.rand(n, generator=g) * 0.01 + 1e-3)
        self.register_buffer("act_scale", torch.rand(17, generator=g) * 0.05 + 0.01)
        self.register_buffer("act_zp", torch.randint(0, 2**a_bits, (17,), generator=g, dtype=torch.int32))
        self.register_buffer("smooth", torch.rand(k, generator=g) + 0.5 if smooth else None)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.bits = (w_bits, 2**a_bits - 1)
        if dynamic:  # per-token dynamic: each row's parameters computed in the graph
            del self.act_scale, self.act_zp
            self.act_scale = self.act_zp = None

    def forward(self, x):
        return torch.ops.vmq.int8_linear(x, self.smooth, self.act_scale, self.act_zp, self.w, self.w_scale, self.w_sum,
                                         self.bias, 0, self.bits[1], self.bits[0])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("k,n,w_bits,a_bits,smooth", [(96, 40, 8, 8, True), (33, 7, 4, 8, False), (20, 9, 4, 4, True)])
def test_int8_linear_translation_gives_the_same_levels(k, n, w_bits, a_bits, smooth, dynamic, tmp_path):
    m = _Int8Linear(k, n, w_bits, a_bits, smooth, dynamic)
    x = _int8_linear_input(k, dynamic)
    res = vmq_fx.export_onnx(m, x[:2], tmp_path / "l.onnx")
    assert _ops(res.path)["MatMulInteger"] == 1
    weight_type = onnx.TensorProto.UINT8 if w_bits == 8 else onnx.TensorProto.INT8  # see the next test
    assert _matmul_integer_input_types(res.path) == [(onnx.TensorProto.UINT8, weight_type)]
    onnx.checker.check_model(onnx.load(res.path), full_check=True)
    torch.testing.assert_close(_run(res.path, x), m(x), rtol=1e-6, atol=1e-6)


def _int8_linear_input(k, dynamic):
    x = torch.randn(5, 17, k, generator=torch.Generator().manual_seed(k)) * 2  # odd K, zero points, saturating values
    if dynamic:
        x[0, 0], x[0, 1], x[1, 2] = 0.0, x[0, 1].abs(), -x[1, 2].abs()  # a zero row; one-signed rows
    return x


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("k,n,w_bits,a_bits,smooth,uint8_weights", [
    # 85 x 200 x 256 multiply-adds: past the direct product, through MatMulInteger. 8-bit weights: the CPU's choice,
    # and uint8 x uint8; up to 7 bits: always uint8 x int8
    (200, 256, 8, 8, True, False), (200, 256, 8, 8, True, True), (200, 256, 4, 8, False, False),
    # small products (MLAS too; with uint8 x uint8 weights the int16 product on x86), and tiny K: the direct product
    (96, 40, 8, 8, True, False), (96, 40, 8, 8, True, True), (33, 7, 4, 8, False, False), (12, 384, 8, 8, True, False),
    (20, 9, 4, 4, True, False)])
def test_custom_int8_linear_op_matches_the_torch_op(k, n, w_bits, a_bits, smooth, uint8_weights, dynamic, tmp_path,
                                                    ort_custom_ops, monkeypatch):
    """vmq.Int8Linear (export_onnx(ops="vmq")) gives the torch op's levels and floats: its quantize and rescale are
    the torch op's row arithmetic, its product exact either way the kernel multiplies (the direct product of tiny K,
    onnxruntime's MatMulInteger of uint8 x int8 or uint8 x uint8, the int16 product of small products where the
    weights go uint8 x uint8)."""
    if uint8_weights:
        monkeypatch.setenv("VMQ_FX_ORT_UINT8_WEIGHTS", "1")
    m = _Int8Linear(k, n, w_bits, a_bits, smooth, dynamic)
    x = _int8_linear_input(k, dynamic)
    res = vmq_fx.export_onnx(m, x[:2], tmp_path / "l.onnx", ops="vmq")
    assert res.op_counts["Int8Linear"] == 1 and "MatMulInteger" not in res.op_counts
    node = next(n for n in onnx.load(res.path).graph.node if n.op_type == "Int8Linear")
    assert node.domain == "vmq" and sum(bool(i) for i in node.input) == 8 - 2 * dynamic - (not smooth)
    torch.testing.assert_close(_run(res.path, x), m(x), rtol=1e-6, atol=1e-6)


def test_custom_int8_linear_op_without_amx_tiles_matches_the_torch_op(tmp_path, ort_custom_ops, monkeypatch):
    """VMQ_FX_ORT_AMX=0 (benchmarks of a CPU without AMX on an AMX one) multiplies on vpdpbusd instead of AMX tiles
    (MatMulInteger on CPUs without VNNI): the same exact sums, the torch op's floats."""
    monkeypatch.setenv("VMQ_FX_ORT_AMX", "0")
    m = _Int8Linear(200, 256, 8, 8, True, False)
    x = _int8_linear_input(200, False)
    res = vmq_fx.export_onnx(m, x[:2], tmp_path / "l.onnx", ops="vmq")
    torch.testing.assert_close(_run(res.path, x), m(x), rtol=1e-6, atol=1e-6)


def _matmul_integer_input_types(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return [tuple(types.get(i) for i in n.input[:2]) for n in model.graph.node if n.op_type == "MatMulInteger"]


@pytest.mark.parametrize("k", [32, 64, 200])
@pytest.mark.parametrize("w_bits,ops", [(8, "onnx"), (7, "onnx"), (4, "onnx"), (8, "vmq"), (8, "vmq-uint8-weights"),
                                        (8, "vmq-int16"), (7, "vmq"), (8, "vmq-matmul-integer")])
def test_int8_linear_translation_is_exact_at_saturating_products(w_bits, ops, k, tmp_path, request, monkeypatch):
    """Every activation at the top level (255) against the largest weights: a uint8 x int8 ``MatMulInteger`` sums pairs
    of products in saturating 16 bits on AVX2 CPUs without VNNI, wrong once 2 x 255 x |w| > 32767 (8-bit weights of
    127). The file must give the exact sums on every CPU: uint8 x uint8 (widened to 16 bits first) for 8-bit weights;
    uint8 x int8 only for weights of up to 7 bits (|w| <= 64: 2 x 255 x 64 = 32640). ``vmq.Int8Linear`` picks the
    form for the CPU it runs on: both of its forms are checked here (the forced uint8 x uint8 one is what CPUs without
    VNNI take; the direct product turned off), its direct product (exact float sums) at K = 32, and the int16 product
    that small products take where the weights go uint8 x uint8 (x86 builds without VNNI; with AVX-512 VNNI its
    vpdpbusd product takes them, and every product of the other vmq cases; MatMulInteger elsewhere)."""
    if ops != "onnx":
        request.getfixturevalue("ort_custom_ops")
    if ops in ("vmq-uint8-weights", "vmq-int16"):
        monkeypatch.setenv("VMQ_FX_ORT_UINT8_WEIGHTS", "1")
    if ops in ("vmq-uint8-weights", "vmq-matmul-integer"):  # not the direct product K = 32 takes
        monkeypatch.setenv("VMQ_FX_ORT_DIRECT", "0")
    m = _Int8Linear(k, 6, 8, 8, smooth=False)
    top = 2 ** (w_bits - 1)
    m.w = torch.full_like(m.w, top - 1)
    m.w[1::2] = -top  # both signs of the largest products
    m.w, m.w_sum = prepare_weight(m.w)
    m.act_zp.zero_()
    x = torch.full((2, 17, k), 1e3)  # clamps to level 255 on every token
    x[:, ::3] = -1e3  # and to level 0 on others
    m.bits = (w_bits, 255)
    res = vmq_fx.export_onnx(m, x, tmp_path / "sat.onnx", ops=ops.split("-")[0])
    if ops == "onnx":
        weight_type = onnx.TensorProto.UINT8 if w_bits == 8 else onnx.TensorProto.INT8
        assert _matmul_integer_input_types(res.path) == [(onnx.TensorProto.UINT8, weight_type)]
    levels = torch.where(x > 0, 255.0, 0.0).double()
    want = levels @ (m.w.double() * m.w_scale.double()[:, None]).t() * m.act_scale.double()[:, None] + m.bias.double()
    assert want.abs().max() > 1  # the products are large, not cancelled
    torch.testing.assert_close(_run(res.path, x).double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.fashion_mnist  # the test_batch fixture reads the Fashion-MNIST test split
@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_lowered_w8a8_w4a8_match_in_onnxruntime(w_bits, name, tmp_path, test_batch):
    model, gm = _ref(name)
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(w_bits, 8)))
    vmq_fx.calibrate(prepared, calibration_images(32), progress=False)
    quantized = convert_pt2e(prepared)
    n_linears = len(vmq_fx.pt2e.quantizer.quantized_linears(quantized))
    lowered = vmq_fx.lower(quantized)
    res = vmq_fx.export_onnx(lowered, test_batch[:2], tmp_path / "q.onnx")
    ops = _ops(res.path)
    assert ops["MatMulInteger"] == n_linears == {"vim-fm-tiny": 48, "vmamba-fm-tiny": 72}[name]
    assert ops["QuantizeLinear"] == n_linears and ops["DequantizeLinear"] == 0
    _check(lowered, res.path, test_batch, fp_model=model)
    weights = [t for t in onnx.load(res.path).graph.initializer if t.name.endswith("_weight") and "vmq_q" in t.name]
    # int8 weights in the file, or 4-bit ones two per byte
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT8 if w_bits == 8 else onnx.TensorProto.UINT8}
    assert len(weights) == n_linears
    k_stored = {t.name: -(-getattr(lowered, t.name).shape[1] // 2) if w_bits == 4 else getattr(lowered, t.name).shape[1]
                for t in weights}
    assert all(list(t.dims) == [getattr(lowered, t.name).shape[0], k_stored[t.name]] for t in weights)


@pytest.mark.fashion_mnist  # the test_batch fixture reads the Fashion-MNIST test split
def test_qdq_reference_graph_exports_and_runs(tmp_path, test_batch):
    model, gm = _ref("vim-fm-tiny")
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.ptq4vm(8, 8)))
    vmq_fx.calibrate(prepared, calibration_images(32), progress=False)
    quantized = convert_pt2e(prepared)
    res = vmq_fx.export_onnx(quantized, test_batch[:2], tmp_path / "qdq.onnx")
    ops = _ops(res.path)
    assert ops["QuantizeLinear"] == 48 and ops["DequantizeLinear"] == 96
    _check(quantized, res.path, test_batch, fp_model=model)


@pytest.mark.fashion_mnist  # the test_batch fixture reads the Fashion-MNIST test split
@pytest.mark.parametrize("name", REFERENCES)
def test_vq_2bit_keeps_codes_in_the_file(name, tmp_path, test_batch, fp_onnx):
    model, gm = _ref(name)
    prepared = prepare_pt2e(copy.deepcopy(gm), VisualMambaQuantizer(recipes.vimvq(2)))
    calib = calibration_images(32)
    vmq_fx.calibrate(prepared, calib, progress=False)
    vmq_fx.vector_quantize(prepared, calib, vmq_fx.VQConfig(steps=2), progress=False)
    quantized = convert_pt2e(prepared)
    n_linears = len(vmq_fx.pt2e.quantizer.quantized_linears(quantized))
    lowered = vmq_fx.lower(quantized)
    res = vmq_fx.export_onnx(lowered, test_batch[:2], tmp_path / "vq.onnx")
    ops = _ops(res.path)
    assert ops["MatMul"] >= n_linears and ops["MatMulInteger"] == 0
    init = {t.name: t for t in onnx.load(res.path).graph.initializer}
    assert not any(n.endswith("in_proj.weight") for n in init)  # no float weights of quantized layers
    codes = [t for n, t in init.items() if n.endswith("vq_codes")]
    assert len(codes) == n_linears and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    assert res.bytes < 0.45 * fp_onnx(name).bytes
    # VQ decoding rounds nothing (a gather, a scale and a float matmul): the float model's bound holds
    _check(lowered, res.path, test_batch)


def test_op_without_translation_is_named(tmp_path):
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.ops.vmq_test.odd(x)

    lib = torch.library.Library("vmq_test", "FRAGMENT")  # noqa: F841 - kept alive for the test
    torch.library.define("vmq_test::odd", "(Tensor x) -> Tensor", lib=lib)
    torch.library.impl("vmq_test::odd", "CPU", lambda x: x * 2, lib=lib)
    torch.library.register_fake("vmq_test::odd", lambda x: torch.empty_like(x), lib=lib)
    with pytest.raises(OnnxExportError, match="no ONNX translation for operator.*vmq_test.odd"):
        vmq_fx.export_onnx(Odd(), torch.randn(2, 3), tmp_path / "odd.onnx")


_EXPORT_IN_A_FRESH_PROCESS = """
import sys, torch, vmq_fx
torch.manual_seed(0)
model = vmq_fx.models.create_model("vim_fm_tiny", depth=1).eval()
calib = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
lowered = vmq_fx.quantize(model, vmq_fx.recipes.smoothquant_pts(4, 8), calib, progress=False).lowered
vmq_fx.export_onnx(lowered, calib[:2], sys.argv[1])
"""


def test_same_model_exports_the_same_bytes(tmp_path):
    model = create_model("vim_fm_tiny", depth=1).eval()
    x = torch.randn(2, 1, 28, 28)
    first = vmq_fx.export_onnx(model, x, tmp_path / "a.onnx").path
    second = vmq_fx.export_onnx(model, x, tmp_path / "b.onnx").path
    assert open(first, "rb").read() == open(second, "rb").read()
    # Across processes too (nothing taken from hash seeds, ids or addresses), for a quantized model: the same seeds
    # give the same file.
    hash_seeds = ("0", "1")
    paths = [tmp_path / f"q{seed}.onnx" for seed in hash_seeds]
    runs = [subprocess.Popen([sys.executable, "-c", _EXPORT_IN_A_FRESH_PROCESS, str(path)], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONHASHSEED": seed})
            for seed, path in zip(hash_seeds, paths)]
    for run in runs:  # side by side: each is mostly importing torch and tracing
        err = run.communicate(timeout=300)[1]
        assert run.returncode == 0, err[-2000:]
    files = [path.read_bytes() for path in paths]
    assert files[0] == files[1] and len(files[0]) > 10_000


# -- vmq.SelectiveScan: the fused kernel as an onnxruntime custom op (export_onnx(ops="vmq")) -------------------------
class _Scan(torch.nn.Module):
    """One vmq::selective_scan; the image-shaped input is u, the rest are buffers. ``sequence_major``: u, delta, B, C
    and z are held [batch, L, channels] and handed to the scan transposed, as the models do."""

    def __init__(self, batch, dim, length, n, groups, optional, softplus, reverse, sequence_major=False):
        super().__init__()
        g = torch.Generator().manual_seed(dim + length + n)
        bc = (batch, n, length) if groups is None else (batch, groups, n, length)
        self.register_buffer("delta", 0.5 * torch.randn(batch, dim, length, generator=g))
        self.register_buffer("A", -(torch.rand(dim, n, generator=g) + 0.2))
        self.register_buffer("B", torch.randn(*bc, generator=g))
        self.register_buffer("C", torch.randn(*bc, generator=g))
        for name, shape in (("D", (dim,)), ("z", (batch, dim, length)), ("delta_bias", (dim,))):
            self.register_buffer(name, torch.randn(*shape, generator=g) if optional else None)
        self.softplus, self.reverse, self.sequence_major = softplus, reverse, sequence_major
        if sequence_major:  # stored [batch, L, channels]; forward transposes them back
            for name in ("delta", "B", "C", "z"):
                t = getattr(self, name)
                if t is not None and t.dim() == 3:
                    setattr(self, name, t.transpose(1, 2).contiguous())

    def forward(self, u):
        def view(t):
            return t.transpose(1, 2) if self.sequence_major and t is not None and t.dim() == 3 else t

        y, last = torch.ops.vmq.selective_scan(view(u), view(self.delta), self.A, view(self.B), view(self.C), self.D,
                                               view(self.z), self.delta_bias, self.softplus, self.reverse)
        return y, last


@pytest.mark.parametrize("shape,optional,softplus,reverse,sequence_major", [
    ((2, 8, 13, 4, None), True, True, False, False),
    ((2, 8, 13, 4, None), True, True, True, False),
    ((2, 8, 13, 4, None), True, True, True, True),
    ((3, 40, 19, 16, 4), True, False, True, False),  # grouped B, C (VMamba)
    ((3, 40, 19, 16, 4), True, False, False, True),  # u, delta, z sequence-major; grouped B, C not
    ((2, 6, 7, 3, None), False, False, False, False),  # no D, z, delta bias
    ((1, 32, 11, 1, 4), False, True, True, False),  # d_state 1
])
def test_custom_scan_op_matches_mamba_ssm_ref_in_onnxruntime(shape, optional, softplus, reverse, sequence_major,
                                                            tmp_path, mamba_ssm_ref, ort_custom_ops):
    batch, dim, length, n, groups = shape
    m = _Scan(batch, dim, length, n, groups, optional, softplus, reverse, sequence_major)
    u = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    if sequence_major:
        u = u.transpose(1, 2).contiguous()
    res = vmq_fx.export_onnx(m, u, tmp_path / "scan.onnx", dynamic_batch=False, ops="vmq")
    assert res.op_counts == {"SelectiveScan": 1, "Transpose": 1}  # y comes out sequence-major; no copies of inputs
    node = next(n for n in onnx.load(res.path).graph.node if n.op_type == "SelectiveScan")
    assert node.domain == "vmq" and sum(bool(i) for i in node.input) == (8 if optional else 5)
    taken = {a.name: list(a.ints) for a in node.attribute}.get("sequence_major", [])
    want = [i for i, given in zip((0, 1, 3, 4, 6), (True, True, groups is None, groups is None, optional)) if given]
    assert taken == (want if sequence_major else [])
    sess = ort_session(res.path)
    y, last = (torch.from_numpy(a) for a in sess.run(None, {sess.get_inputs()[0].name: u.numpy()}))
    flip = (lambda t: t.flip(-1) if t is not None and t.dim() >= 3 else t) if reverse else (lambda t: t)  # noqa: E731
    view = (lambda t: t.transpose(1, 2) if t is not None and t.dim() == 3 else t) if sequence_major else (  # noqa: E731
        lambda t: t)
    ref_y, ref_last = mamba_ssm_ref(flip(view(u)), flip(view(m.delta)), m.A, flip(view(m.B)), flip(view(m.C)), m.D,
                                    flip(view(m.z)), m.delta_bias, delta_softplus=softplus, return_last_state=True)
    scale = ref_y.abs().max()
    torch.testing.assert_close(y, flip(ref_y), atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=1e-5 * ref_last.abs().max(), rtol=1e-5)


class _Conv(torch.nn.Module):
    def __init__(self, weight, bias, silu, reverse):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.silu, self.reverse = silu, reverse

    def forward(self, x):
        return torch.ops.vmq.causal_conv1d(x, self.weight, self.bias, self.silu, self.reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("bias,kernel,channels", [(True, 4, 20), (False, 2, 33), (True, 1, 8)])
def test_custom_causal_conv_op_matches_float64_convolution(bias, kernel, channels, silu, reverse, tmp_path,
                                                           ort_custom_ops):
    from test_causal_conv1d import conv_reference

    g = torch.Generator().manual_seed(kernel + channels)
    x, w = torch.randn(3, 9, channels, generator=g), torch.randn(channels, kernel, generator=g)
    b = torch.randn(channels, generator=g) if bias else None
    res = vmq_fx.export_onnx(_Conv(w, b, silu, reverse), x, tmp_path / "conv.onnx", ops="vmq")
    assert res.op_counts["CausalConv1d"] == 1 and "Slice" not in res.op_counts and "Pad" not in res.op_counts
    ref = conv_reference(x, w, b, silu, reverse)
    out = _run(res.path, x).double()
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


class _SplitInProj(torch.nn.Module):
    """Vim's pattern: in_proj's output split into the convolution's input and the scan's gate."""

    def __init__(self, batch, channels, length, n, reverse):
        super().__init__()
        g = torch.Generator().manual_seed(channels + length)
        self.register_buffer("weight", torch.randn(channels, 4, generator=g))
        self.register_buffer("bias", torch.randn(channels, generator=g))
        self.register_buffer("A", -(torch.rand(channels, n, generator=g) + 0.2))
        self.register_buffer("B", torch.randn(batch, n, length, generator=g))
        self.register_buffer("C", torch.randn(batch, n, length, generator=g))
        self.register_buffer("D", torch.randn(channels, generator=g))
        self.reverse = reverse

    def forward(self, xz):  # [batch, L, 2 channels]
        x, z = xz.chunk(2, dim=-1)
        u = torch.ops.vmq.causal_conv1d(x, self.weight, self.bias, True, self.reverse).transpose(1, 2)
        y, _ = torch.ops.vmq.selective_scan(u, 0.5 * u, self.A, self.B, self.C, self.D, z.transpose(1, 2), None, True,
                                            self.reverse)
        return y


@pytest.mark.parametrize("reverse", [False, True])
def test_custom_ops_read_split_slices_in_place(reverse, tmp_path, mamba_ssm_ref, ort_custom_ops):
    from test_causal_conv1d import conv_reference

    batch, channels, length, n = 2, 20, 9, 4
    m = _SplitInProj(batch, channels, length, n, reverse)
    xz = torch.randn(batch, length, 2 * channels, generator=torch.Generator().manual_seed(2))
    res = vmq_fx.export_onnx(m, xz, tmp_path / "split.onnx", dynamic_batch=False, ops="vmq")
    assert "Split" not in res.op_counts  # both slices read in place: the copy is gone
    graph = onnx.load(res.path).graph
    attrs = {n.op_type: {a.name: a.i for a in n.attribute} for n in graph.node if n.domain == "vmq"}
    assert attrs["CausalConv1d"]["offset"] == 0 and attrs["SelectiveScan"]["z_offset"] == channels
    assert all(n.input[0] == graph.input[0].name for n in graph.node if n.op_type == "CausalConv1d")
    # references: the float64 convolution, then mamba-ssm's scan (float32; in reverse by flipping)
    x, z = xz.chunk(2, dim=-1)
    u = conv_reference(x.double(), m.weight.double(), m.bias.double(), True, reverse).float().transpose(1, 2)
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    ref = flip(mamba_ssm_ref(flip(u), flip(0.5 * u), m.A, flip(m.B), flip(m.C), m.D, flip(z.transpose(1, 2)), None,
                             delta_softplus=True))
    out = _run(res.path, xz)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max(), rtol=1e-5)


@pytest.mark.fashion_mnist  # the test_batch fixture reads the Fashion-MNIST test split
@pytest.mark.parametrize("name", REFERENCES)
def test_models_with_the_custom_scan_match_torch(name, tmp_path, test_batch, ort_custom_ops):
    model, gm = _ref(name)
    res = vmq_fx.export_onnx(model, test_batch[:2], tmp_path / "fp.onnx", ops="vmq")
    scans = sum(n.target is torch.ops.vmq.selective_scan.default for n in gm.graph.nodes)
    assert res.op_counts["SelectiveScan"] == scans and "Scan" not in res.op_counts
    out = _run(res.path, test_batch)
    assert _rel(out, model(test_batch)) < REL_BOUND and torch.equal(out.argmax(-1), model(test_batch).argmax(-1))


def test_a_library_that_does_not_compile_says_where_in_one_line(ort_custom_ops, tmp_path, monkeypatch):
    """The onnxruntime library's build reports the compiler's first error (file, line, what), as the torch build's."""
    from vmq_fx.export import ort_ops

    monkeypatch.setenv("VMQ_FX_ORT_INCLUDE", str(ort_ops.headers_dir()))  # before the cache moves below
    (tmp_path / "ort").mkdir()
    (tmp_path / "ort" / "broken.cpp").write_text("int broken() {\n  return undeclared_name;\n}\n")
    monkeypatch.setattr(ort_ops, "_CSRC", tmp_path)
    monkeypatch.setattr(ort_ops, "_SOURCES", ("ort/broken.cpp",))
    monkeypatch.setattr(ort_ops, "_DEPENDS", ())
    monkeypatch.setenv("VMQ_FX_CACHE", str(tmp_path / "cache"))
    ort_ops.custom_ops_library.cache_clear()
    try:
        with pytest.raises(ort_ops.OrtCustomOpsUnavailable) as err:
            ort_ops.custom_ops_library()
    finally:
        ort_ops.custom_ops_library.cache_clear()
    where = tmp_path / "ort" / "broken.cpp"
    assert str(err.value).startswith(f"the vmq onnxruntime library could not be built: {where}:2:")
    assert "undeclared_name" in str(err.value) and "\n" not in str(err.value)


def test_custom_scan_without_headers_says_how_to_get_them(tmp_path, monkeypatch):
    from vmq_fx.export import ort_ops

    monkeypatch.setenv("VMQ_FX_ORT_INCLUDE", str(tmp_path))  # an empty folder
    ort_ops.custom_ops_library.cache_clear()
    try:
        with pytest.raises(ort_ops.OrtCustomOpsUnavailable, match="--fetch-headers"):
            ort_ops.custom_ops_library()
    finally:
        ort_ops.custom_ops_library.cache_clear()
    with pytest.raises(ValueError, match="ops must be one of onnx, vmq"):
        vmq_fx.export_onnx(create_model("vim_fm_tiny", depth=1).eval(), torch.randn(2, 1, 28, 28),
                           tmp_path / "x.onnx", ops="fast")
