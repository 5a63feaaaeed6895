import pytest
import torch

from vmq_fx.models import VimConfig, create_model, list_models

SCAN = torch.ops.vmq.selective_scan.default


def _export(model, batch=3, size=28, chans=1):
    x = torch.randn(batch, chans, size, size)
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _count(ep, target):
    return sum(1 for n in ep.graph.nodes if n.target is target)


@pytest.mark.parametrize("name, scans", [("vim_fm_tiny", 2 * 8), ("vmamba_fm_tiny", 2 + 4)])
def test_export_dynamic_batch_one_scan_node_per_scan(name, scans):
    torch.manual_seed(0)
    model = create_model(name).eval()
    ep = _export(model)
    assert _count(ep, SCAN) == scans
    for batch in (1, 5):  # other batch sizes than the one traced
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            ref = model(x)
            out = ep.module()(x)
        assert out.shape == (batch, 10)
        torch.testing.assert_close(out, ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-5)


def test_vim_tiny_224_exports_with_48_scans():
    model = create_model("vim_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    ep = torch.export.export(model, (x,))
    assert _count(ep, SCAN) == 48
    lin = torch.ops.aten.linear.default
    # Per block: in_proj, out_proj, and x_proj + dt_proj for each direction; plus the head.
    assert _count(ep, lin) == 24 * 6 + 1


def test_vim_middle_class_token_and_state_dict_keys():
    model = create_model("vim_fm_tiny")
    assert model.config.num_tokens == 17 and model.token_position == 8
    keys = set(model.state_dict())
    # Official Vim checkpoint names (vim_t_midclstok_76p1acc.pth).
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "norm_f.weight", "head.weight",
              "layers.0.norm.weight", "layers.0.mixer.in_proj.weight", "layers.0.mixer.out_proj.weight",
              "layers.0.mixer.conv1d.weight", "layers.0.mixer.conv1d_b.bias", "layers.0.mixer.x_proj_b.weight",
              "layers.0.mixer.dt_proj_b.bias", "layers.0.mixer.A_b_log", "layers.0.mixer.D_b",
              "layers.7.mixer.A_log", "layers.7.mixer.D"]:
        assert k in keys, k
    assert not any("bias" in k for k in keys if "in_proj" in k or "out_proj" in k)


def test_vim_backward_direction_reads_flipped_sequence():
    # With the backward branch's parameters zeroed out of the picture (conv_b = 0 except bias 0 and D_b = 0),
    # the output must not change when the tokens after a position change in the forward-only branch: checks that
    # the two directions are wired as a causal scan one way and an anti-causal scan the other.
    torch.manual_seed(0)
    mixer = create_model("vim_fm_tiny").layers[0].mixer.eval()
    x = torch.randn(1, 9, mixer.d_model)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
        for p in (mixer.conv1d_b.weight, mixer.conv1d_b.bias, mixer.D_b):
            p.zero_()
        f, f2 = mixer(x), mixer(x2)
    assert (y[:, :6] - y2[:, :6]).abs().max() > 1e-4  # the backward scan carries later tokens to earlier ones
    torch.testing.assert_close(f[:, :6], f2[:, :6])  # the forward scan alone is causal


@pytest.mark.parametrize("name", ["vim_fm_tiny", "vmamba_fm_tiny"])
def test_wrong_image_size_is_a_clear_error(name):
    model = create_model(name)
    with pytest.raises(ValueError, match=r"expects images of shape \[batch, 1, 28, 28\]"):
        model(torch.randn(1, 1, 32, 32))


def test_unknown_model_and_bad_config():
    with pytest.raises(ValueError, match="unknown model 'vim_huge'.*vim_tiny"):
        create_model("vim_huge")
    with pytest.raises(ValueError, match="no field"):
        create_model("vim_fm_tiny", width=3)
    with pytest.raises(ValueError, match="does not tile"):
        VimConfig(img_size=28, patch_size=5)
    assert {"vim_tiny", "vim_small", "vim_base", "vmambav2v_tiny", "vmambav2_tiny", "vim_fm_tiny",
            "vmamba_fm_tiny"} <= set(list_models())
