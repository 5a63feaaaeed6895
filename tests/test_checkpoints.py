"""Loading Vim and VMamba checkpoints: official containers and layouts, shape inference, refusals."""
import argparse

import pytest
import torch

from vmq_fx.models import CheckpointMismatchError, VMambaConfig, create_model, load_checkpoint
from vmq_fx.models.registry import build_model

# A small VMamba of the released v2 family (patch embedding v2, downsampling v3, no conv bias, d_state 1).
SMALL_V2 = VMambaConfig(img_size=64, dims=(32, 64), depths=(1, 2), d_state=1, ssm_ratio=1.0, mlp_ratio=2.0,
                        gate=False, patch_embed="v2", downsample="v3", conv_bias=False, num_classes=7)


def _randomized(model):
    with torch.no_grad():  # the init leaves biases at 0 and norms at 1: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def official_vmamba_layout(state):
    """vmq_fx's VMamba state dict in the layout of the released MzeroMiko/VMamba checkpoints, written out here
    (stacked per-direction projections, classifier.*), independently of the loader's conversion."""
    out, stacks = {}, {}
    for key, value in state.items():
        parts = key.split(".")
        if "x_proj" in parts or "dt_proj" in parts:
            i = parts.index("x_proj") if "x_proj" in parts else parts.index("dt_proj")
            stem, kind, direction, leaf = ".".join(parts[:i]), parts[i], int(parts[i + 1]), parts[i + 2]
            name = {"x_proj": "x_proj_weight", "dt_proj": f"dt_projs_{leaf}"}[kind]
            stacks.setdefault(f"{stem}.{name}", {})[direction] = value
        elif parts[0] in ("norm", "head"):
            out["classifier." + key] = value
        else:
            out[key] = value
    for key, by_direction in stacks.items():
        out[key] = torch.stack([by_direction[k] for k in sorted(by_direction)])
    return out


def test_vim_training_checkpoint_with_args_optimizer_and_ema(tmp_path):
    model = _randomized(create_model("vim_fm_tiny"))
    ema = _randomized(create_model("vim_fm_tiny"))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(path)(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(load_checkpoint(path, use_ema=True)(x), ema(x), rtol=0, atol=0)


def test_vim_configuration_is_inferred_from_shapes(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(create_model("vim_fm_tiny").state_dict(), path)  # a bare state dict is accepted too
    assert load_checkpoint(path).config == create_model("vim_fm_tiny").config  # a named shape: its preprocessing
    odd = create_model("vim_fm_tiny", depth=3, embed_dim=48, num_classes=4)  # no named configuration
    torch.save({"model": odd.state_dict()}, path)
    cfg = load_checkpoint(path).config
    assert (cfg.depth, cfg.embed_dim, cfg.num_classes, cfg.img_size, cfg.patch_size) == (3, 48, 4, 28, 7)


def test_vim_tiny_shapes_infer_vim_tiny(tmp_path):
    path = tmp_path / "vim_t.pth"
    torch.save({"model": create_model("vim_tiny").state_dict()}, path)
    model = load_checkpoint(path)
    assert model.config == create_model("vim_tiny").config and model.config.num_tokens == 197


def test_released_vmamba_layout_loads_with_the_same_outputs(tmp_path):
    source = _randomized(build_model(SMALL_V2))
    path = tmp_path / "vmamba.pth"
    torch.save({"model": official_vmamba_layout(source.state_dict()), "args": argparse.Namespace(cfg="x.yaml")},
               path)
    loaded = load_checkpoint(path, img_size=64)  # VMamba has no position embedding: the size is the user's
    assert loaded.config == SMALL_V2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vmambav2v_tiny", "vmambav2_tiny", "vmambav2v_small", "vmambav2_base"])
def test_released_vmamba_shapes_infer_the_named_configuration(name, tmp_path):
    path = tmp_path / "v.pth"
    torch.save({"model": official_vmamba_layout(create_model(name).state_dict())}, path)
    assert load_checkpoint(path).config == create_model(name).config


def test_refusals_name_the_file_and_the_keys(tmp_path):
    path = tmp_path / "bad.pth"
    vim = create_model("vim_fm_tiny").state_dict()
    torch.save({"model": {k: v for k, v in vim.items() if k != "norm_f.weight"}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"bad.pth does not match(.|\n)*norm_f.weight"):
        load_checkpoint(path, "vim_fm_tiny")
    torch.save({"model": create_model("vmamba_fm_tiny").state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match="VMamba checkpoint, but the configuration given is a VimConfig"):
        load_checkpoint(path, "vim_fm_tiny")
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointMismatchError, match="neither a Vim checkpoint.*encoder.weight"):
        load_checkpoint(path)
    both = {**vim, "layers.0.blocks.0.norm.weight": torch.zeros(2)}
    torch.save(both, path)
    with pytest.raises(CheckpointMismatchError, match="both Vim keys"):
        load_checkpoint(path)
    torch.save({"epoch": 3, "model": "weights.bin"}, path)
    with pytest.raises(ValueError, match="entry 'model' is a str"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="no 'model_ema' entry"):
        torch.save({"model": vim}, path)
        load_checkpoint(path, use_ema=True)
    with pytest.raises(ValueError, match="unknown configuration 'vim_huge'"):
        load_checkpoint(path, "vim_huge")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")


class _Custom:  # a pickled object of a class torch's weights-only loader does not allow
    pass


def test_a_pickled_object_is_refused_by_name(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": create_model("vim_fm_tiny").state_dict(), "extra": _Custom()}, path)
    with pytest.raises(ValueError, match="pickled test_checkpoints._Custom object, which is not loaded"):
        load_checkpoint(path)
