"""vmq_fx.runtime.CppGraphModule: a graph run by the C++ runner gives the bits of the same graph run as Python."""
import operator

import pytest
import torch
from torch import fx

import vmq_fx
from vmq_fx import recipes
from vmq_fx.ops import native
from vmq_fx.runtime import CppGraphModule

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the runner is part of vmq_fx's C++ extension")


def _calls(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


@pytest.mark.parametrize("recipe", [recipes.smoothquant_pts(8, 8), recipes.smoothquant_pts(4, 8),
                                    recipes.vq_kmeans(2, kmeans_iters=2)], ids=["w8a8", "w4a8", "vq2"])
@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_lowered_models_give_the_same_bits_at_every_batch(request, family, recipe):
    model, _ = request.getfixturevalue(family)
    calib = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    lowered = vmq_fx.quantize(model, recipe, calib, progress=False).lowered
    runner = CppGraphModule(lowered)
    # every op node of the graph is one step (the lowered graph has no input guard)
    assert runner.num_steps == _calls(lowered)
    with torch.no_grad():
        for batch in (1, 3):  # the lowered graph's batch is dynamic (aten.sym_size feeds size lists)
            x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
            expected = lowered(x)
            assert torch.equal(runner(x), expected)


def test_an_exported_fp32_model_runs_with_its_input_guard(vim):
    model, exported = vim
    runner = CppGraphModule(exported)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = runner(x)
        assert torch.equal(out, exported(x))
        # and against the eager model, an independent path (nn.Module code, not the exported graph)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] == 1"):  # torch.export's input check
        runner(torch.randn(2, 3, 28, 28))


class _Numbers(torch.nn.Module):
    def forward(self, x):
        i = x.to(torch.int32) + 1  # a Python number where add.Tensor takes a tensor: the sum stays int32
        h = x.half() * 0.5  # and float16
        return i, h, (x + 1e-5) * 2


def test_python_numbers_keep_torchs_type_promotion():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    gm = torch.export.export(_Numbers(), (x,)).module()
    got, want = CppGraphModule(gm)(x), gm(x)
    assert isinstance(got, tuple) and len(got) == 3
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


class _Pieces(torch.nn.Module):
    def forward(self, x):
        a, b, c = torch.split(x, [1, 2, 3], dim=-1)  # a list output taken apart by getitem
        m, i = torch.max(x, dim=-1)  # a tuple output
        return {"sum": a + c[..., :1], "mid": b.transpose(0, 1), "max": m, "arg": i}


def test_list_and_tuple_outputs_and_a_dict_result():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    gm = torch.export.export(_Pieces(), (x,)).module()
    assert any(n.target is operator.getitem for n in gm.graph.nodes)
    got, want = CppGraphModule(gm)(x), gm(x)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key])


def test_a_node_that_is_not_a_torch_op_is_refused_naming_it():
    class Method(torch.nn.Module):
        def forward(self, x):
            return x.relu()

    gm = fx.symbolic_trace(Method())  # x.relu() stays a call_method node
    with pytest.raises(ValueError, match="node relu is a call_method"):
        CppGraphModule(gm)

    gm = fx.symbolic_trace(lambda x: torch.relu(x) + 1)  # torch.relu, not an OpOverload
    with pytest.raises(ValueError, match="node relu calls .*not a torch op"):
        CppGraphModule(gm)
