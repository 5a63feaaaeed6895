import contextlib

import pytest
import torch

from vmq_fx.ops import native
from int8_cases import int8_case
from vmq_fx.ops import int8_linear_reference, pack_int4, unpack_int4
from vmq_fx.ops.int8_linear import dynamic_token_qparams, int8_linear

SHAPES = [(2, 17, 96, 40), (1, 5, 7, 3), (3, 50, 33, 65), (4, 1, 16, 16)]
# Past the kernel's direct product (more than 2^20 multiply-adds, 16 rows and K = 32): a GEMM library multiplies.
LIBRARY_SHAPE = (2, 80, 72, 400)
BITS = [(8, 8), (4, 8), (6, 6), (4, 4)]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_bits, a_bits, packed", [(8, 8, False), (4, 8, True), (4, 8, False), (6, 6, False),
                                                    (4, 4, True)])
def test_int8_linear_matches_float64_dequantize_then_matmul(shape, w_bits, a_bits, packed, dynamic, implementation):
    op_args, ref_args = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, packed=packed, dynamic=dynamic)
    out = int8_linear(*op_args)
    ref = int8_linear_reference(*ref_args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # The same levels on both sides, the integer product exact: only the float rescale rounds (~1e-7 relative). One
    # activation level off on one element would be ~1e-3 of the output range here.
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 50, 33, 65), LIBRARY_SHAPE], ids=["direct", "library"])
@pytest.mark.parametrize("w_bits, a_bits", BITS)
def test_fused_and_torch_paths_agree(w_bits, a_bits, shape):
    op_args, _ = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, seed=1)
    x, smooth, scale, zp, qmin, qmax = op_args[0], op_args[1], op_args[2], op_args[3], op_args[8], op_args[9]
    assert native.kernels() is not None
    # The same integer levels as quantize_per_channel's formula (the integer product is then exact), from every build
    # this machine runs (each narrows its vectors of levels to bytes its own way) ...
    shift = 128 if qmax > 127 else 0  # levels are stored in int8
    want = torch.clamp(torch.round(x / smooth * (1.0 / scale)[:, None]) + zp[:, None].float(), qmin, qmax)
    for isa in native.executable_isas():
        with native.use_isa(isa) as kernels:
            levels = kernels.quantize_per_token(x.reshape(-1, x.shape[-1]), smooth, scale, zp, qmin, qmax, shift)
        assert torch.equal(levels.reshape(x.shape).float() + shift, want), isa
    # ... and the same floats from the rescale: the kernel rounds its product before adding the bias, as torch does.
    # (Where the CPU takes the float path, the pure-torch implementation multiplies in the fp32 GEMM and rounds.)
    fused = int8_linear(*op_args)
    with native.disabled():
        reference = int8_linear(*op_args)
    if native.int8_gemm_path()[0] == "float":
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6 * fused.abs().max().item())
    else:
        assert torch.equal(fused, reference)


def test_ties_round_to_even(implementation):
    # Power-of-two scale and x on half levels: every x / scale is an exact tie, where rounding modes differ.
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-20, 20, (2, 17, 32), generator=g).float() + 0.5) * 0.0625
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    scale, zp = torch.full((17,), 0.0625), torch.full((17,), 128, dtype=torch.int32)
    out = int8_linear(x, None, scale, zp, w, torch.ones(16), w.int().sum(1, dtype=torch.int32), None, 0, 255, 8)
    ref = int8_linear_reference(x, None, scale, zp, w, torch.ones(16), None, 0, 255)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-9)


def test_dynamic_rows_at_the_edges_of_the_range(implementation):
    """Rows that exercise each clamp of the parameters: all zero (the scale is float32 epsilon), all positive (zero
    point at qmin), all negative (at qmax), one huge value, ties; against torchao's choose_qparams_affine /
    quantize_affine (the reference), for 8- and 4-bit activations, with and without smoothing."""
    g = torch.Generator().manual_seed(5)
    rows = torch.stack([torch.zeros(24), torch.rand(24, generator=g) + 1.0, -torch.rand(24, generator=g) - 0.5,
                        torch.cat([torch.full((1,), 1e4), torch.randn(23, generator=g)]),
                        (torch.randint(-8, 8, (24,), generator=g).float() + 0.5) * 0.25, torch.randn(24, generator=g)])
    x = rows.reshape(2, 3, 24)
    w = torch.randint(-127, 128, (10, 24), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(10, generator=g) * 0.01, torch.randn(10, generator=g)
    for qmax, smooth in ((255, None), (15, torch.rand(24, generator=g) + 0.5)):
        out = int8_linear(x, smooth, None, None, w, w_scale, w.int().sum(1, dtype=torch.int32), bias, 0, qmax, 8)
        ref = int8_linear_reference(x, smooth, None, None, w, w_scale, bias, 0, qmax)
        torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_dynamic_parameters_need_both_or_neither():
    op_args, _ = int8_case(2, 17, 16, 8, w_bits=8)
    with pytest.raises(ValueError, match="both given .static. or both None"):
        int8_linear(*op_args[:3], None, *op_args[4:])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [*SHAPES, LIBRARY_SHAPE])
@pytest.mark.parametrize("w_bits, a_bits, packed", [(8, 8, False), (4, 8, True), (4, 4, True)])
def test_both_integer_product_paths_match_float64(shape, w_bits, a_bits, packed, dynamic, int8_gemm):
    op_args, ref_args = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, packed=packed, dynamic=dynamic)
    ref = int8_linear_reference(*ref_args)
    torch.testing.assert_close(int8_linear(*op_args).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(2, 9, 12, 40), LIBRARY_SHAPE], ids=["dt_proj", "library"])
def test_rows_a_stride_apart_give_the_contiguous_bits(shape, dynamic, int8_gemm):
    # dt_proj's input is a slice of x_proj's output (rows 44 floats apart): the kernel copies such rows itself.
    op_args, ref_args = int8_case(*shape, w_bits=8, dynamic=dynamic)
    x = op_args[0]
    wide = torch.cat([x, torch.full_like(x, 1e6)], -1)[..., :x.shape[-1]]
    assert not wide.is_contiguous() and torch.equal(wide, x)
    out = int8_linear(wide, *op_args[1:])
    assert torch.equal(out, int8_linear(*op_args))
    ref = int8_linear_reference(*ref_args)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_one_input_channel_on_every_path(w_bits, implementation, int8_gemm):
    """K = 1 (an outlier-channel linear of dt_proj): torch._int_mm returns wrong numbers for the transposed [1, N]
    weight (strides (1, 1)), so the ops must not hand it such a product. 34 rows: past _int_mm's 16-row minimum."""
    op_args, ref_args = int8_case(2, 17, 1, 38, w_bits=w_bits, packed=False)
    ref = int8_linear_reference(*ref_args)
    torch.testing.assert_close(int8_linear(*op_args).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def _onednn_capped_below_int8_dot() -> bool:
    """oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA, how the benchmarks emulate an AVX2 CPU): its int8 products then
    saturate, which is why int8_gemm_path never picks torch._int_mm then."""
    import os

    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in native.ONEDNN_CAPS_WITHOUT_INT8_DOT


def _names(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_int8_linear_multiplies_as_its_path_says(int8_gemm):
    op_args, _ = int8_case(2, 80, 72, 400, w_bits=8)  # 4.6e6 multiply-adds: past the direct product
    names = _names(lambda: int8_linear(*op_args))
    library = {"aten::_int_mm", "aten::mm", "aten::addmm"}
    if int8_gemm == "int_mm":
        assert "aten::_int_mm" in names
    elif int8_gemm in ("int16", "vnni", "amx"):  # the kernel's own int16 or uint8 x int8 products: no library call
        assert not library & names, names
    else:  # the fp32 GEMM on the levels, never torch._int_mm (slow without VNNI)
        assert {"aten::mm", "aten::addmm"} & names and "aten::_int_mm" not in names
    # Small products and few rows multiply in the kernel itself on every path: no library call. So does tiny K at any
    # size, except against the fp32 GEMM (the float path, and tiny K on the int16 path) in builds narrower than
    # AVX-512, where that GEMM is faster.
    for shape in ((2, 17, 96, 40), (1, 9, 512, 700)):
        assert not library & _names(lambda: int8_linear(*int8_case(*shape, w_bits=8)[0])), shape
    tiny_k_direct = int8_gemm in ("int_mm", "vnni", "amx") or native.selected_isa() == "avx512"
    names = _names(lambda: int8_linear(*int8_case(4, 197, 12, 384, w_bits=8)[0]))
    assert bool(library & names) != tiny_k_direct, names
    with native.disabled():  # the pure-torch implementation follows the CPU's choice (_int_mm for the own products)
        uses_int_mm = "aten::_int_mm" in _names(lambda: int8_linear(*op_args))
        assert uses_int_mm == (native.int8_gemm_path()[0] in ("int_mm", "vnni", "amx"))


@pytest.mark.parametrize("k", [64, 1536])
def test_float_product_path_at_the_largest_products(k):
    """Activations at the extreme levels against weights of +-127 (every product as large as it gets), at Vim-B's
    largest K: the fp32 GEMM path stays within float rounding of the float64 reference."""
    g = torch.Generator().manual_seed(k)
    x = torch.where(torch.rand(2, 17, k, generator=g) < 0.5, -1e3, 1e3)  # levels 0 and 255
    w = torch.where(torch.rand(24, k, generator=g) < 0.5, -127, 127).to(torch.int8)
    w_scale, act_scale, zp = torch.rand(24, generator=g) + 0.5, torch.full((17,), 0.25), torch.full((17,), 3,
                                                                                                  dtype=torch.int32)
    args = (x, None, act_scale, zp, w, w_scale, w.int().sum(1, dtype=torch.int32), None, 0, 255, 8)
    ref = int8_linear_reference(x, None, act_scale, zp, w, w_scale, None, 0, 255)
    with native.use_isa(native.selected_isa(), int8_gemm="float"):
        out = int8_linear(*args)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_float_path_reuses_its_dequantized_weight_only_for_the_same_tensors():
    """The kernel caches w_int * w_scale per weight tensor: a new scale (or a new weight at a recycled address) must
    not reuse a stale entry."""
    op_args, ref_args = int8_case(2, 17, 32, 8, w_bits=8)
    with native.use_isa(native.selected_isa(), int8_gemm="float"):
        first = int8_linear(*op_args)
        args = list(op_args)
        args[5] = op_args[5] * 2  # w_scale
        torch.testing.assert_close(int8_linear(*args), 2 * first - (op_args[7] if op_args[7] is not None else 0),
                                   rtol=1e-5, atol=1e-5)
        for seed in range(3):  # fresh weights, likely at the freed ones' address
            op_args, ref_args = int8_case(2, 17, 32, 8, w_bits=8, seed=seed + 10)
            ref = int8_linear_reference(*ref_args)
            torch.testing.assert_close(int8_linear(*op_args).double(), ref, rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("shape", [SHAPES[0], LIBRARY_SHAPE])
def test_kept_weight_forms_follow_in_place_writes_and_inference_tensors(shape, int8_gemm):
    """Each path's kept form of the weight (dequantized, prepacked, int16 or float levels) is made again after a
    weight scale is written in place, and weights made under torch.inference_mode (no version counter) run."""
    op_args, ref_args = int8_case(*shape, w_bits=8, bias=False)
    first = int8_linear(*op_args)
    op_args[5].mul_(2)  # w_scale, in place
    torch.testing.assert_close(int8_linear(*op_args), 2 * first, rtol=1e-6, atol=1e-6 * first.abs().max().item())
    with torch.inference_mode():
        op_args, ref_args = int8_case(*shape, w_bits=8, seed=3)
        outs = [int8_linear(*op_args) for _ in range(2)]
    ref = int8_linear_reference(*ref_args)
    for out in outs:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_each_build_keeps_its_own_weight_forms():
    """The same weight through every build in one process: each build lays out its int16 levels for its own vector
    width (40 columns pad to 64 with AVX-512, to 48 with AVX2), so what one build keeps of a weight must not serve
    another."""
    if native.selected_isa() == "neon":
        pytest.skip("the int16 product is x86 only")
    op_args, ref_args = int8_case(2, 40, 64, 40, w_bits=8)
    ref = int8_linear_reference(*ref_args)
    for _ in range(2):
        for isa in native.executable_isas():
            with native.use_isa(isa, int8_gemm="int16"):
                torch.testing.assert_close(int8_linear(*op_args).double(), ref, rtol=1e-5,
                                           atol=1e-5 * ref.abs().max().item(), msg=isa)


@pytest.mark.parametrize("k", [8, 7, 1])
def test_int4_pack_round_trip(k):
    w = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), w)


def test_int8_linear_opcheck_and_shape_errors():
    op_args, _ = int8_case(2, 17, 16, 8, w_bits=8)
    torch.library.opcheck(torch.ops.vmq.int8_linear.default, op_args)
    torch.library.opcheck(torch.ops.vmq.int8_linear.default, int8_case(2, 17, 16, 8, w_bits=8, dynamic=True)[0])
    bad = list(op_args)
    bad[2] = torch.ones(5)
    with pytest.raises(ValueError, match="act_scale"):
        int8_linear(*bad)
    bad = list(op_args)
    bad[6] = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="column sums"):
        int8_linear(*bad)
    bad = list(op_args)
    bad[4] = pack_int4(torch.zeros(8, 16, dtype=torch.int8))  # packed 4-bit storage with w_bits=8
    with pytest.raises(ValueError, match="packed"):
        int8_linear(*bad)


@pytest.mark.parametrize("path", ["torch", "fused"])
def test_an_input_that_requires_grad_is_refused_with_one_message_on_every_path(path):
    """The quantized linears have no backward: on the pure-torch and the C++ path alike, an input that requires grad
    is refused at the call (not silently given an output without gradient), with the same text; under no_grad the call
    runs."""
    op_args, _ = int8_case(2, 17, 16, 8, w_bits=8, a_bits=8, seed=3)
    x = op_args[0].clone().requires_grad_()
    args = (x, *op_args[1:])
    context = native.disabled() if path == "torch" else contextlib.nullcontext()
    if path == "fused":
        assert native.kernels() is not None
    with context:
        with pytest.raises(RuntimeError) as err:
            torch.ops.vmq.int8_linear(*args)
        with torch.no_grad():
            out = torch.ops.vmq.int8_linear(*args)
    assert out.shape == (2, 17, 8) and not out.requires_grad
    assert "vmq.int8_linear: no backward (the weights and scales are quantized constants); run the quantized model " \
           "under torch.no_grad(), or differentiate the prepared (fake-quantized) model" in str(err.value)


def _exact_int8_linear(x, smooth, act_scale, zp, w_int, w_scale, bias, qmin, qmax):
    """What every exact path must return bit for bit, computed here independently: the levels by torch's formula (as
    quantize_per_channel rounds them), the product in int64, then the rescale as torch's float32 ops round it."""
    k = x.shape[-1]
    x = x.float() if smooth is None else x.float() / smooth
    x = x.reshape(-1, x.shape[-2], k)
    if act_scale is None:
        scale, zp = dynamic_token_qparams(x, qmin, qmax)
    else:
        scale, zp = act_scale.expand(x.shape[:2]), zp.expand(x.shape[:2])
    scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    levels = torch.clamp(torch.round(x.reshape(-1, k) * (1.0 / scale)) + zp.float(), qmin, qmax)
    acc = (levels.long() - zp.long()) @ w_int.long().t()
    out = acc.float() * scale * w_scale[None, :]
    return out if bias is None else out + bias


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(1, 1, 6, 192), (2, 3, 12, 17), (1, 17, 96, 384), (3, 5, 33, 65), (1, 7, 200, 100),
                                   (2, 9, 1, 40), (4, 197, 12, 384)])
@pytest.mark.parametrize("w_bits, a_bits, packed", [(8, 8, False), (4, 8, True), (4, 4, True)])
def test_direct_product_is_exact_bit_for_bit(shape, w_bits, a_bits, packed, dynamic):
    """The C++ kernel's direct product (small products, few rows, tiny K; every row and column tail of its 4-row
    blocks) gives exactly the floats of an int64 product rescaled in float32 by torch, in every build this machine
    runs and on every product path."""
    op_args, ref_args = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, packed=packed, dynamic=dynamic)
    want = _exact_int8_linear(*ref_args).reshape(*shape[:2], shape[3])
    assert native.kernels() is not None
    large = shape[0] * shape[1] * shape[2] * shape[3] > 2**20  # direct as tiny K only
    for isa in native.executable_isas():
        for path in native.INT8_GEMM_PATHS:
            if not native.int8_gemm_runs(path, isa):
                continue
            if large and path in ("float", "int16") and isa != "avx512":
                continue  # the fp32 GEMM multiplies tiny K there (faster than the direct product in those builds)
            with native.use_isa(isa, int8_gemm=path):
                assert torch.equal(int8_linear(*op_args), want), (isa, path)
    if _onednn_capped_below_int8_dot():
        return  # torch._int_mm saturates there: no exact library product to compare with
    # The same shapes through the library's exact integer product, the direct product turned off
    with native.use_isa(native.selected_isa(), int8_gemm="int_mm") as kernels:
        kernels.set_int8_direct(False)
        try:
            names = _names(lambda: int8_linear(*op_args))
            assert torch.equal(int8_linear(*op_args), want)
        finally:
            kernels.set_int8_direct(True)
    assert {"aten::_int_mm", "aten::matmul"} & names


def _largest_sums_case(k, rows=8):
    """vmq::int8_linear's arguments with sums of +-K * 255 * 128 (or 127), and the exact floats it must return: rows of
    level 255 at zero point 0 and of level 0 at zero point 255; the first 20 weight rows of one sign, the rest mixed."""
    g = torch.Generator().manual_seed(k)
    x = torch.tensor([1e3, -1e3] * (rows // 2)).reshape(1, rows, 1).expand(1, rows, k)
    zp = torch.tensor([0, 255] * (rows // 2), dtype=torch.int32)
    w = torch.where(torch.rand(40, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    w[:10], w[10:20] = -128, 127
    args = (x, None, torch.full((rows,), 0.25), zp, w, torch.rand(40, generator=g) + 0.5,
            w.int().sum(1, dtype=torch.int32), torch.randn(40, generator=g), 0, 255, 8)
    want = _exact_int8_linear(*args[:5], args[5], args[7], 0, 255)
    assert want.abs().max() > 2e6  # the sums at the bound
    return args, want


@pytest.mark.parametrize("k", [514, 515])
def test_direct_product_at_its_largest_sums(k):
    """Levels 255 away from the zero point against weights of -128 / 127: the sums reach K * 255 * 128, exact in the
    direct product's float32 up to 2^24 (K = 514). On x86 the int16 product takes these small products at any K
    (int32 sums); elsewhere one more input channel hands the product to the exact integer GEMM. The floats are the
    same either way."""
    args, want = _largest_sums_case(k)
    assert native.kernels() is not None
    names = _names(lambda: int8_linear(*args))
    path = native.int8_gemm_path()[0]
    # x86 builds: the int16 product takes these (small products, K > 32) whatever the path, exact at any K here
    x86 = native.selected_isa() != "neon"
    assert bool({"aten::_int_mm", "aten::mm", "aten::addmm", "aten::matmul"} & names) == (k > 514 and not x86)
    if k <= 514 or x86 or path != "float":  # the float path's GEMM rounds past the direct product
        assert torch.equal(int8_linear(*args).reshape(8, 40), want)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(1, 7, 33, 17), (2, 9, 385, 70), (1, 23, 64, 16)])
@pytest.mark.parametrize("w_bits, a_bits, packed", [(8, 8, False), (4, 8, True), (4, 4, True)])
def test_int16_product_is_exact_bit_for_bit(shape, w_bits, a_bits, packed, dynamic):
    """The int16 product (x86 CPUs without VNNI): the floats of an int64 product rescaled in float32 by torch, on row
    tails of its 5-row blocks, odd K (the pair padded), column tails, in every x86 build this machine runs, without a
    library call; and the pure-torch implementation's float GEMM gives the same integers."""
    if native.selected_isa() == "neon":
        pytest.skip("the int16 product is x86 only (vpmaddwd)")
    op_args, ref_args = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, packed=packed, dynamic=dynamic)
    want = _exact_int8_linear(*ref_args).reshape(*shape[:2], shape[3])
    for isa in native.executable_isas():
        with native.use_isa(isa, int8_gemm="int16") as kernels:
            kernels.set_int8_direct(False)  # small products too: only the int16 product runs
            try:
                names = _names(lambda: int8_linear(*op_args))
                assert torch.equal(int8_linear(*op_args), want), isa
            finally:
                kernels.set_int8_direct(True)
            assert not {"aten::_int_mm", "aten::mm", "aten::addmm", "aten::matmul"} & names, (isa, names)
            with native.disabled():
                assert torch.equal(int8_linear(*op_args), want), isa


@pytest.mark.parametrize("k", [514, 1536])
def test_int16_product_at_its_largest_sums(k):
    """Levels 255 away from the zero point against weights of -128 / 127, up to K = 1536 (Vim-B's largest), where
    the sums pass float32's exact integers: the int16 product's int32 sums, and the pure-torch implementation's
    float64 GEMM, stay exact."""
    if native.selected_isa() == "neon":
        pytest.skip("the int16 product is x86 only (vpmaddwd)")
    args, want = _largest_sums_case(k)
    for isa in native.executable_isas():
        with native.use_isa(isa, int8_gemm="int16"):
            assert torch.equal(int8_linear(*args).reshape(8, 40), want), isa
            with native.disabled():
                assert torch.equal(int8_linear(*args).reshape(8, 40), want), isa


# The kernel's own uint8 x int8 products: vpdpbusd (CPUs with AVX-512 VNNI) and AMX tiles (CPUs with AMX-INT8; on
# its path the products of 32 rows and more with K > 32, the others on vpdpbusd), with the shapes that reach each one's
# tails: rows past its blocks (8 / 32 rows), K not a multiple of 4 / 64 (the padded quad / tile), column tails, several
# column panels (K = 1536: 160 columns a panel).
OWN_PRODUCT_SHAPES = {"vnni": [(1, 19, 1536, 400), (2, 9, 385, 70), (1, 23, 12, 16), (3, 5, 33, 65)],
                      "amx": [(1, 45, 1536, 400), (2, 37, 385, 70), (1, 64, 192, 32), (3, 11, 65, 33)]}


def _skip_unless_it_runs(product):
    if not native.int8_gemm_runs(product, "avx512"):
        pytest.skip(f"{native._PATH_NEEDS[product]}; this CPU has "
                    f"{' / '.join(sorted(native.INT8_DOT_FLAGS & native._cpu_flags())) or 'neither'}")


def _only_the_own_product(product, op_args):
    """vmq::int8_linear on the path of its own product (vnni or amx) with the direct product off (so that small products
    take it too): its output and the operators it called."""
    with native.use_isa("avx512", int8_gemm=product) as kernels:
        assert kernels.int8_gemm() == product  # the kernel refuses a product this CPU cannot run
        kernels.set_int8_direct(False)
        try:
            return int8_linear(*op_args), _names(lambda: int8_linear(*op_args))
        finally:
            kernels.set_int8_direct(True)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("w_bits, a_bits, packed", [(8, 8, False), (4, 8, True), (4, 4, True)])
@pytest.mark.parametrize("product", ["vnni", "amx"])
def test_own_uint8_product_is_exact_bit_for_bit(product, case, w_bits, a_bits, packed, dynamic):
    """The kernel's own uint8 x int8 products: the floats of an int64 product rescaled in float32 by torch, on the
    shapes of OWN_PRODUCT_SHAPES, without a library call."""
    _skip_unless_it_runs(product)
    shape = OWN_PRODUCT_SHAPES[product][case]
    op_args, ref_args = int8_case(*shape, w_bits=w_bits, a_bits=a_bits, packed=packed, dynamic=dynamic)
    out, names = _only_the_own_product(product, op_args)
    assert torch.equal(out, _exact_int8_linear(*ref_args).reshape(*shape[:2], shape[3]))
    assert not {"aten::_int_mm", "aten::mm", "aten::addmm", "aten::matmul"} & names, names


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("qmin, qmax", [(-128, 127), (-8, 7)])
@pytest.mark.parametrize("product", ["vnni", "amx"])
def test_own_uint8_product_moves_signed_levels_into_uint8(product, qmin, qmax, dynamic):
    """Signed activation levels go into the unsigned operand (vpdpbusd's, tdpbusd's) moved up by 128, their zero points
    with them: the same exact floats."""
    _skip_unless_it_runs(product)
    op_args, ref_args = int8_case(2, 41, 70, 50, w_bits=8, dynamic=dynamic)
    g = torch.Generator().manual_seed(1)
    zp = None if dynamic else torch.randint(qmin, qmax + 1, (41,), generator=g, dtype=torch.int32)
    op_args = (*op_args[:3], zp, *op_args[4:8], qmin, qmax, op_args[10])
    ref_args = (*ref_args[:3], zp, *ref_args[4:7], qmin, qmax)
    out, _ = _only_the_own_product(product, op_args)
    assert torch.equal(out, _exact_int8_linear(*ref_args).reshape(2, 41, 50))


@pytest.mark.parametrize("k", [514, 1536])
@pytest.mark.parametrize("product", ["vnni", "amx"])
def test_own_uint8_product_at_its_largest_sums(product, k):
    """Levels 255 away from the zero point against weights of -128 / 127, up to K = 1536: the int32 sums stay exact
    (40 rows: one AMX block and a tail)."""
    _skip_unless_it_runs(product)
    args, want = _largest_sums_case(k, rows=40)
    out, _ = _only_the_own_product(product, args)
    assert torch.equal(out.reshape(40, 40), want)


def test_zero_points_outside_the_levels_skip_the_direct_product():
    """The direct product's bound needs |level - zero point| <= qmax - qmin; a zero point outside [qmin, qmax] (not
    what the lowering makes, but a valid call) goes to an exact integer product: on x86 the int16 one (any zero point
    within int16), elsewhere the integer GEMM."""
    op_args, ref_args = int8_case(2, 17, 96, 40, w_bits=8)
    zp = op_args[3].clone()
    zp[3] = 300
    op_args, ref_args = (*op_args[:3], zp, *op_args[4:]), (*ref_args[:3], zp, *ref_args[4:])
    ref = int8_linear_reference(*ref_args)
    want = _exact_int8_linear(*ref_args).reshape(2, 17, 40)
    with native.use_isa(native.selected_isa(), int8_gemm="int_mm"):
        names = _names(lambda: int8_linear(*op_args))
        out = int8_linear(*op_args)
        torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    if native.selected_isa() == "neon":
        assert "aten::_int_mm" in names
    else:
        assert not {"aten::_int_mm", "aten::matmul"} & names and torch.equal(out, want)
