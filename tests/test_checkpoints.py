"""Loading Vim and VMamba checkpoints: official containers and layouts, shape inference, refusals."""
import argparse
import dataclasses
import logging
import pickle
import sys
import types

import pytest
import torch

from vmq_fx.models import CheckpointMismatchError, VimConfig, VMambaConfig, create_model, load_checkpoint
from vmq_fx.models.registry import MODEL_CONFIGS, build_model

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
    with pytest.raises(ValueError, match="junk.pth is neither a torch checkpoint nor safetensors"):
        load_checkpoint(tmp_path / "junk.pth")


class _Custom:  # a pickled object of a class torch's weights-only loader does not allow
    pass


def test_unsafe_and_broken_files_are_refused_in_one_line_that_names_the_cause(tmp_path):
    state = create_model("vim_fm_tiny").state_dict()
    messages = []

    def refused(path, pattern):
        with pytest.raises(ValueError, match=pattern) as e:
            load_checkpoint(path)
        messages.append(str(e.value))

    path = tmp_path / "pickled.pth"
    torch.save({"model": state, "extra": _Custom()}, path)
    refused(path, "pickled test_checkpoints._Custom object, which is not loaded")
    plain = tmp_path / "plain.pkl"  # pickle.dump, not torch.save: never unpickled, its imports are named
    with open(plain, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "extra": _Custom()}, f)
    refused(plain, r"plain Python pickle, not a torch.save file; .*imports .*test_checkpoints._Custom")
    whole = tmp_path / "whole.pth"
    torch.save({"model": state}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    refused(cut, "cut.pth is cut short or damaged")
    torch.save({"model": state}, whole, _use_new_zipfile_serialization=False)  # torch's legacy format
    assert load_checkpoint(whole).config.depth == 8
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    refused(cut, "cut.pth could not be read as a torch checkpoint .* damaged")
    cut.write_bytes(pickle.dumps({"model": 1})[:5])  # a pickle stream that ends before its end
    refused(cut, "cut.pth is cut short or damaged")
    assert all("weights_only" not in m and "\n" not in m for m in messages), messages


def test_vmamba_training_checkpoint_with_a_yacs_config_loads_without_running_yacs(tmp_path, monkeypatch, caplog):
    """VMamba's save_checkpoint_ema stores the yacs CfgNode; a stand-in yacs module (a dict subclass holding
    attributes, as CfgNode is) pickles it, and loading must not need, import or run it."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __setstate__(self, state):  # pragma: no cover - loading must never call it
            raise AssertionError("yacs code ran while loading")

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    cfg, model_cfg = CfgNode(), CfgNode()
    model_cfg["TYPE"] = "vssm"
    cfg["MODEL"], cfg["TAG"] = model_cfg, "default"
    cfg.__dict__.update({"__immutable__": True, "__new_allowed__": False})
    source = _randomized(build_model(SMALL_V2))
    path = tmp_path / "ckpt_epoch_3.pth"
    torch.save({"model": official_vmamba_layout(source.state_dict()), "config": cfg, "epoch": 3,
                "max_accuracy": 71.2}, path)
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.delitem(sys.modules, "yacs.config")
    with caplog.at_level(logging.INFO, logger="vmq_fx"):
        loaded = load_checkpoint(path, img_size=64)
    assert "yacs" not in sys.modules
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    assert "weights from 'model' (the file also holds config, epoch, max_accuracy)" in caplog.text


def test_each_load_logs_its_configuration_weights_and_other_entries(tmp_path, caplog):
    model = create_model("vim_fm_tiny")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 1,
                "args": argparse.Namespace(model="vim")}, path)
    with caplog.at_level(logging.INFO, logger="vmq_fx"):
        load_checkpoint(path, use_ema=True)
        load_checkpoint(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "vmq_fx.models.checkpoint"]
    assert lines == [f"{path}: the vim_fm_tiny configuration (28x28, stride 7); weights from 'model_ema' (the file "
                     "also holds args, epoch, model)",
                     f"{path}: the vim_fm_tiny configuration (28x28, stride 7); weights from 'model' (the file also "
                     "holds args, epoch, model_ema)"]


def test_stride8_vim_loads_as_the_released_layout_and_the_log_names_the_other_fit(tmp_path, caplog):
    """A 27x27 grid of 16-pixel patches is Vim-T stride 8 at 224 (the official fine-tuning models) or stride 16 at
    432: the tensors are the same, so the named (released) layout is taken and the log says what else fits."""
    source = _randomized(create_model("vim_tiny_stride8"))
    path = tmp_path / "vim_t_stride8.pth"
    torch.save({"model": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="vmq_fx"):
        loaded = load_checkpoint(path)
    assert (loaded.config.img_size, loaded.config.stride, loaded.config.num_tokens) == (224, 8, 730)
    assert "the vim_tiny_stride8 configuration (224x224, stride 8); the same tensors would also fit 432x432, " \
           "stride 16" in caplog.text
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    for geometry in ({"img_size": 432}, {"stride": 16}, {"img_size": 432, "stride": 16}):
        cfg = load_checkpoint(path, **geometry).config
        assert (cfg.img_size, cfg.stride or cfg.patch_size, cfg.num_tokens) == (432, 16, 730), geometry
    with pytest.raises(CheckpointMismatchError, match=r"27x27 patches of 16 pixels .* do not tile img_size 300"):
        load_checkpoint(path, img_size=300)
    with pytest.raises(CheckpointMismatchError, match="do not tile img_size 224 with stride 16"):
        load_checkpoint(path, img_size=224, stride=16)


def test_two_named_configurations_with_the_same_tensors_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_CONFIGS, "vim_tiny_432", VimConfig(img_size=432, embed_dim=192, depth=24))
    path = tmp_path / "vim.pth"
    torch.save({"model": create_model("vim_tiny_stride8").state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"several configurations \(vim_tiny_stride8: 224x224, stride 8; "
                                                      r"vim_tiny_432: 432x432, stride 16\)"):
        load_checkpoint(path)
    assert load_checkpoint(path, stride=8).config.img_size == 224  # the user's word decides


def test_an_unnamed_vim_says_the_stride_was_assumed(tmp_path, caplog):
    path = tmp_path / "vim.pth"
    torch.save(create_model("vim_fm_tiny", depth=2).state_dict(), path)
    with caplog.at_level(logging.INFO, logger="vmq_fx"):
        assert load_checkpoint(path).config.stride is None
    assert "stride = patch size assumed" in caplog.text


def test_mismatches_list_ten_keys_each_named_as_in_the_file(tmp_path):
    vim = create_model("vim_fm_tiny").state_dict()
    dropped = sorted(k for k in vim if k.startswith(("layers.0.", "layers.1.")))[:15]
    path = tmp_path / "renamed.pth"
    torch.save({"model": {**{k: v for k, v in vim.items() if k not in dropped}, "extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(path, "vim_fm_tiny")
    missing = next(line for line in str(e.value).splitlines() if "missing keys" in line)
    assert missing == f"  missing keys (15): {', '.join(dropped[:10])}, ... (+5 more)"
    assert "  unexpected keys (1): extra.weight" in str(e.value).splitlines()
    # released VMamba layout: the stacked x_proj_weight of the file, not the per-direction tensors it is split into
    state = official_vmamba_layout(build_model(SMALL_V2).state_dict())
    del state["classifier.head.bias"]
    torch.save({"model": state}, path)
    other = dataclasses.replace(SMALL_V2, d_state=4)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(path, other)
    text = str(e.value)
    assert "  missing keys (1): classifier.head.bias" in text.splitlines()
    expected = build_model(other).state_dict()["layers.1.blocks.0.op.x_proj.0.weight"].shape
    file_shape = tuple(state["layers.1.blocks.0.op.x_proj_weight"].shape)
    assert (f"    layers.1.blocks.0.op.x_proj_weight: checkpoint {file_shape} vs model (4, {expected[0]}, "
            f"{expected[1]})") in text.splitlines()
    assert "x_proj.0" not in text and "dt_proj.0" not in text
