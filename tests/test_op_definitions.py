"""Each vmq op has one definition (its torch.library schema in vmq_fx/ops/<op>.py). What restates it elsewhere is
checked against it here: the named views of a node's arguments, the ONNX translations, the Triton launchers, and the
input checks of the C++ kernels (same refusal, same text, on every path)."""
import dataclasses
import inspect

import pytest
import torch

from int8_cases import int8_case
from vmq_fx.export.onnx import onnx_translation_table
from vmq_fx.ops import native, pack_codes, pack_int4
from vmq_fx.ops._schema import argument_names
from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.ops.vq_linear import VQLinearArgs

vmq = torch.ops.vmq
OPS = (vmq.selective_scan.default, vmq.causal_conv1d.default, vmq.hadamard_transform.default, vmq.rms_norm.default,
       vmq.add_rms_norm.default, vmq.int8_linear.default, vmq.vq_linear.default, vmq.vq_dequantize.default)


@pytest.mark.parametrize("view, op", [(Int8LinearArgs, vmq.int8_linear.default), (VQLinearArgs, vmq.vq_linear.default)])
def test_named_views_are_the_schema(view, op):
    assert [f.name for f in dataclasses.fields(view)] == argument_names(op)


@pytest.mark.parametrize("ops", ["onnx", "vmq"])
def test_onnx_translations_take_the_schema_arguments(ops):
    table = onnx_translation_table(ops)
    aten = torch.ops.aten
    assert set(table) == set(OPS) | {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default}
    for op, fn in table.items():
        assert list(inspect.signature(fn).parameters) == argument_names(op), op


def test_triton_launchers_take_the_schema_arguments():
    pytest.importorskip("triton")
    from vmq_fx.ops.triton.int8_linear import int8_linear_triton
    from vmq_fx.ops.triton.selective_scan import selective_scan_triton
    from vmq_fx.ops.triton.vq_linear import vq_linear_triton

    for fn, op in ((int8_linear_triton, vmq.int8_linear.default), (vq_linear_triton, vmq.vq_linear.default),
                   (selective_scan_triton, vmq.selective_scan.default)):
        assert list(inspect.signature(fn).parameters) == argument_names(op), fn.__name__


def test_named_view_reads_positional_and_keyword_calls():
    op_args, _ = int8_case(1, 5, 8, 4, w_bits=8)
    graph = torch.fx.Graph()
    nodes = [graph.placeholder(f"a{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(op_args)]
    by_position = graph.call_function(vmq.int8_linear.default, tuple(nodes))
    by_keyword = graph.call_function(vmq.int8_linear.default, (), dict(zip(argument_names(vmq.int8_linear.default),
                                                                         nodes)))
    assert Int8LinearArgs.from_node(by_position) == Int8LinearArgs.from_node(by_keyword)
    assert Int8LinearArgs.from_node(by_keyword).w_bits == op_args[10]
    with pytest.raises(ValueError, match="not vmq.vq_linear.default"):
        VQLinearArgs.from_node(by_position)


def _refusal(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def _on_every_path(call) -> dict[str, str]:
    messages = {}
    with native.disabled():
        messages["torch"] = _refusal(call)
    for isa in native.executable_isas():
        with native.use_isa(isa):
            messages[isa] = _refusal(call)
    return messages


def _bad_calls():
    op_args, _ = int8_case(2, 17, 16, 8, w_bits=8)
    bad_scale = list(op_args)
    bad_scale[2] = torch.ones(5)
    bad_sum = list(op_args)
    bad_sum[6] = torch.ones(3, dtype=torch.int32)
    packed_8bit = list(op_args)
    packed_8bit[4] = pack_int4(torch.zeros(8, 16, dtype=torch.int8))
    codes = pack_codes(torch.randint(0, 16, (3, 2)), 4)
    book, scale = torch.randn(16, 4).half(), torch.full((3,), 128, dtype=torch.uint8)
    x3 = torch.randn(1, 6, 3)
    half_dynamic = list(op_args)
    half_dynamic[3] = None
    return {
        "int8_linear act_scale": lambda: vmq.int8_linear(*bad_scale),
        "int8_linear half dynamic": lambda: vmq.int8_linear(*half_dynamic),
        "int8_linear column sums": lambda: vmq.int8_linear(*bad_sum),
        "int8_linear packed 8-bit": lambda: vmq.int8_linear(*packed_8bit),
        "vq_linear codes": lambda: vmq.vq_linear(torch.randn(2, 9), codes, book, scale, None, 9),
        "vq_linear row scale": lambda: vmq.vq_linear(torch.randn(2, 8), codes, book, scale[:2], None, 8),
        "causal_conv1d weight": lambda: vmq.causal_conv1d(x3, torch.randn(4, 4), None, True, False),
        "causal_conv1d bias": lambda: vmq.causal_conv1d(x3, torch.randn(3, 4), torch.randn(2), True, False),
        "causal_conv1d x": lambda: vmq.causal_conv1d(torch.randn(6, 3), torch.randn(3, 4), None, True, False),
        "hadamard_transform size": lambda: vmq.hadamard_transform(torch.randn(2, 24), torch.eye(5)),
        "hadamard_transform odd": lambda: vmq.hadamard_transform(torch.randn(2, 24), torch.eye(3)[:2]),
        "hadamard_transform dtype": lambda: vmq.hadamard_transform(torch.ones(2, 8, dtype=torch.int32), None),
        "hadamard_transform scalar": lambda: vmq.hadamard_transform(torch.tensor(1.0), None),
        "rms_norm weight": lambda: vmq.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5),
        "rms_norm dtype": lambda: vmq.rms_norm(torch.ones(2, 8, dtype=torch.float16), torch.ones(8), 1e-5),
        "rms_norm scalar": lambda: vmq.rms_norm(torch.tensor(1.0), torch.ones(1), 1e-5),
        "add_rms_norm residual": lambda: vmq.add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), 1e-5),
        "add_rms_norm residual dtype": lambda: vmq.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).double(),
                                                                torch.ones(8), 1e-5),
        "add_rms_norm weight": lambda: vmq.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), 1e-5),
        "token_stats x": lambda: vmq.token_stats(torch.randn(4, 5)),
        "histogram_add x": lambda: vmq.histogram_add(torch.randn(4, 5), torch.zeros(4, 8), torch.zeros(4),
                                                     torch.ones(4), torch.zeros(4), torch.ones(4)),
        "histogram_add counts": lambda: vmq.histogram_add(torch.randn(2, 4, 3), torch.zeros(4, 7), torch.zeros(4),
                                                          torch.ones(4), torch.zeros(4), torch.ones(4)),
        **{f"selective_scan {name}": (lambda change=change: vmq.selective_scan(**{**_scan_args(), **change}))
           for name, change in (("delta", {"delta": torch.randn(2, 8, 4)}), ("A", {"A": torch.randn(7, 4)}),
                                ("B", {"B": torch.randn(8, 4)}), ("C groups", {"C": torch.randn(2, 3, 4, 5)}),
                                ("D", {"D": torch.randn(5)}), ("z", {"z": torch.randn(2, 8, 3)}))},
    }


def _scan_args():
    return dict(u=torch.randn(2, 8, 5), delta=torch.randn(2, 8, 5), A=-torch.rand(8, 4), B=torch.randn(2, 4, 5),
                C=torch.randn(2, 4, 5), D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False)


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_is_refused_with_the_same_message_on_every_path(case):
    messages = _on_every_path(_bad_calls()[case])
    assert len(set(messages.values())) == 1, messages
    assert next(iter(messages.values())).startswith("vmq."), messages


def _helper_calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=g)
    lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    counts, start, width = torch.zeros(6, 16), lo.clone(), (hi - lo) / 16 * 1.01
    u, delta = torch.randn(2, 4, 5, generator=g), torch.rand(2, 4, 5, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    return {
        "hadamard_transform": (vmq.hadamard_transform.default, (torch.randn(2, 3, 12, generator=g, requires_grad=True),
                                                               torch.eye(3)[[2, 0, 1]])),
        "rms_norm": (vmq.rms_norm.default, (torch.randn(2, 3, 40, generator=g, requires_grad=True),
                                            torch.rand(40, generator=g, requires_grad=True), 1e-5)),
        "add_rms_norm": (vmq.add_rms_norm.default, (torch.randn(2, 3, 40, generator=g, requires_grad=True),
                                                    torch.randn(2, 3, 40, generator=g, requires_grad=True),
                                                    torch.rand(40, generator=g, requires_grad=True), 1e-5)),
        "token_stats": (vmq.token_stats.default, (x,)),
        "histogram_add": (vmq.histogram_add.default, (2 * x, counts, start, width, 2 * lo, 2 * hi)),
        "histogram_search": (vmq.histogram_search.default, (counts + 1, start, width, lo, hi, 16, 2.4, 20)),
        "selective_scan_backward": (vmq.selective_scan_backward.default,
                                    (u, delta, A, B, C, torch.randn(4, generator=g), None, None, True, False,
                                     torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 3, generator=g))),
    }


@pytest.mark.parametrize("name", list(_helper_calls()))
def test_helper_ops_pass_opcheck_on_every_path(name, implementation):
    op, args = _helper_calls()[name]
    torch.library.opcheck(op, args)
