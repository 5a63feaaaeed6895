import pytest
import torch

from vmq_fx.models import MambaMixer
from vmq_fx.models import adapt_mamba_ssm


@pytest.fixture()
def mamba_simple(mamba_ssm_ref, monkeypatch):
    import mamba_ssm.modules.mamba_simple as mamba_simple

    # On CPU, mamba-ssm's slow path calls selective_scan_fn (CUDA); its pure-torch reference is the oracle.
    monkeypatch.setattr(mamba_simple, "selective_scan_fn", mamba_ssm_ref)
    return mamba_simple


class _Net(torch.nn.Module):
    def __init__(self, mamba_cls):
        super().__init__()
        self.embed = torch.nn.Linear(3, 32)
        self.blocks = torch.nn.ModuleList(mamba_cls(32, d_state=8, layer_idx=i) for i in range(2))
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = h + blk(self.norm(h))
        return h


def test_adapted_mamba_matches_mamba_ssm_and_exports(mamba_simple):
    torch.manual_seed(0)
    net = _Net(mamba_simple.Mamba).eval()
    x = torch.randn(2, 11, 3)
    with torch.no_grad():
        mixer_in = net.norm(net.embed(x))
        ref_mixer = net.blocks[0](mixer_in)
        ref = net(x)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    adapt_mamba_ssm(net)
    assert all(isinstance(b, MambaMixer) for b in net.blocks)
    assert set(net.state_dict()) == set(sd)  # same parameter names
    with torch.no_grad():
        torch.testing.assert_close(net.blocks[0](mixer_in), ref_mixer, atol=1e-5 * ref_mixer.abs().max(), rtol=1e-4)
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    ep = torch.export.export(net, (x,))
    assert sum(n.target is torch.ops.vmq.selective_scan.default for n in ep.graph.nodes) == 2
    torch.testing.assert_close(ep.module()(x), ref, atol=1e-5, rtol=1e-5)


def test_adapter_refuses_models_without_mamba():
    with pytest.raises(ValueError, match="no mamba_ssm"):
        adapt_mamba_ssm(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_adapted_mamba_quantizes_saves_and_loads(mamba_simple, tmp_path):
    import vmq_fx

    torch.manual_seed(0)
    net = adapt_mamba_ssm(_Net(mamba_simple.Mamba).eval())
    x = torch.randn(4, 11, 3)
    lowered = vmq_fx.quantize(net, vmq_fx.recipes.smoothquant_pts(8, 8), x, progress=False).lowered
    # in_proj, x_proj, dt_proj, out_proj of each block
    assert sum(n.target is torch.ops.vmq.int8_linear.default for n in lowered.graph.nodes) == 8
    path = tmp_path / "adapted.safetensors"
    vmq_fx.save_quantized(lowered, path)  # no vmq_fx configuration: the graph is in the file
    loaded = vmq_fx.load_quantized(path)
    y = torch.randn(3, 11, 3)
    assert torch.equal(loaded(y), lowered(y))
    assert "vmq_config" not in loaded.meta
