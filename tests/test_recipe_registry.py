"""A recipe family is added by one module that registers it: here a toy family defined in this file only (weight-only
int8 per channel, per-tensor static activations, its own presets and name head) goes through names, the quantizer,
calibration, convert, lowering and save / load without any change to vmq_fx."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationSpec

import vmq_fx
from vmq_fx.ops.int8_linear import Int8LinearArgs
from vmq_fx.pt2e import recipes
from vmq_fx.pt2e.recipes import RECIPE_FAMILIES, Recipe, register_recipe


@pytest.fixture
def toy_family():
    @register_recipe(presets={"toy": {}, "toy-wide": {"act_bits": 8}})
    @dataclass(frozen=True)
    class ToyRecipe(Recipe):
        head_pattern: ClassVar[str] = r"(?P<w>\d)of8"
        example_head: ClassVar[str] = "<W>of8"
        w_bits: int = 8
        act_bits: int = 7

        def head(self):
            return f"{self.w_bits}of8"

        @classmethod
        def head_fields(cls, match, extra):
            return {"w_bits": int(match.group("w"))}

        def act_qspec(self):
            return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=2**self.act_bits - 1,
                                    qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=MinMaxObserver)

        def weight_qspec(self):
            qmax = 2 ** (self.w_bits - 1) - 1
            return QuantizationSpec(dtype=torch.int8, quant_min=-qmax, quant_max=qmax,
                                    qscheme=torch.per_channel_symmetric, ch_axis=0,
                                    observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(
                                        ch_axis=0, qscheme=torch.per_channel_symmetric))

    yield ToyRecipe
    del RECIPE_FAMILIES["ToyRecipe"]


def test_a_toy_family_registered_in_one_file_runs_through_the_whole_flow(toy_family, tmp_path):
    assert "toy-<W>of8" in recipes.names() and "toy-wide-<W>of8" in recipes.names()
    recipe = recipes.from_name("toy-6of8")
    assert recipe == toy_family(w_bits=6) and recipe.name == "toy-6of8"
    assert recipes.from_name("toy-wide-6of8").act_bits == 8 and toy_family(w_bits=6, act_bits=5).name == \
        "toy-6of8[act_bits=5]"
    torch.manual_seed(0)
    model = vmq_fx.models.create_model("vim_fm_tiny", depth=2).eval()
    calib = torch.randn(16, 1, 28, 28)
    with pytest.raises(ValueError, match="has no optimization step"):
        vmq_fx.quantize(model, recipe, calib, vmq_fx.JLSSConfig(), progress=False)
    res = vmq_fx.quantize(model, recipe, calib, progress=False)
    int8 = [n for n in res.lowered.graph.nodes if n.target is torch.ops.vmq.int8_linear.default]
    args = [Int8LinearArgs.from_node(n) for n in int8]
    assert len(args) == 12 and {a.act_qmax for a in args} == {127} and {a.w_bits for a in args} == {6}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        rel = ((res.lowered(x) - model(x)).norm() / model(x).norm()).item()
    assert rel < 0.1  # a quantized model of the float one, not noise
    path = tmp_path / "toy.safetensors"
    vmq_fx.save_quantized(res.lowered, path, model.config)
    loaded = vmq_fx.load_quantized(path)
    assert {n.meta["vmq_linear"].recipe for n in loaded.graph.nodes if "vmq_linear" in n.meta} == {recipe}
    assert torch.equal(loaded(x), res.lowered(x))


def test_registration_refuses_what_is_not_a_frozen_recipe_and_taken_preset_names():
    with pytest.raises(TypeError, match="not a frozen dataclass derived from Recipe"):
        register_recipe(presets={"x": {}})(dict)
    with pytest.raises(ValueError, match="preset 'ptq4vm' of Clash is PTQ4VMRecipe's"):
        @register_recipe(presets={"ptq4vm": {}})
        @dataclass(frozen=True)
        class Clash(Recipe):
            head_pattern: ClassVar[str] = "x"

            def head(self):
                return "x"

            @classmethod
            def head_fields(cls, match, extra):
                return {}

            def act_qspec(self):
                return None

            def weight_qspec(self):
                return None
    assert "Clash" not in RECIPE_FAMILIES
