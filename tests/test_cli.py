import argparse
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmq_fx.app.cli import main
from vmq_fx.app.images import imagenet_synsets
from vmq_fx.models import create_model
from vmq_fx.ops.int8_linear import Int8LinearArgs



def _one_error_line(capsys, code, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and all(n in err[0] for n in needles), err
    return err[0]


def test_list_shows_configs_and_references(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "vim_tiny" in out and "vmambav2v_tiny" in out and "vim-fm-tiny" in out and "197 tokens" in out


def test_errors_are_one_line_and_nonzero(capsys):
    _one_error_line(capsys, main(["export", "vim_huge"]), "vmq: error: unknown model 'vim_huge'")
    _one_error_line(capsys, main(["eval", "no-such-model"]), "unknown model 'no-such-model'")


@pytest.mark.parametrize("argv,message", [
    (["quantize", "vim-fm-tiny", "--recipe", "ptq4vm-w9a8", "--out-dir", "x"], "w_bits must be an integer in 2..8"),
    (["quantize", "vim-fm-tiny", "--recipe", "gptq-4bit", "--out-dir", "x"], "unknown recipe 'gptq-4bit'"),
    (["quantize", "vim-huge", "--recipe", "vimvq-2bit", "--out-dir", "x"], "unknown model 'vim-huge'"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--out-dir", "x", "--steps", "-3"],
     "--steps: must be at least 0, got -3"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--out-dir", "x", "--calib-dir", "/nonexistent"],
     "--calib-dir: no folder /nonexistent"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--out-dir", "x", "--data-dir", "/nonexistent"],
     "Fashion-MNIST"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--out-dir", "/etc/hostname"], "is not a folder"),
    (["bench", "vim-fm-tiny", "--batch", "0"], "--batch: must be at least 1, got 0"),
    (["export-onnx", "vim-huge", "-o", "x.onnx"], "unknown model 'vim-huge'"),
    (["eval", "vim-fm-tiny", "--threads", "-1"], "--threads: expected a count >= 1 or auto (all cores), got -1"),
    (["eval", "vim-fm-tiny", "--threads", "0"], "--threads: expected a count >= 1 or auto (all cores), got 0"),
    (["eval", "vim-fm-tiny", "--config", "vmamba_tiny"],
     "--config is for checkpoints; vim-fm-tiny is a shipped reference model with its own configuration"),
    (["quantize", "vim-fm-tiny", "--recipe", "sq-pts-w8a8", "--keep-float", "foo_proj", "--out-dir", "x"],
     "--keep-float 'foo_proj': neither a role (in_proj, x_proj, dt_proj, out_proj, fc1, fc2) nor the path of a "
     "linear of this model"),
    (["quantize", "vim-fm-tiny", "--recipe", "sq-pts-w8a8", "--layer-recipe", "layers.9.*=sq-pts-w4a8",
      "--out-dir", "x"], "--layer-recipe 'layers.9.*': neither a role"),
    (["quantize", "vim-fm-tiny", "--recipe", "ptq4vm-w4a4[alpha=abc]", "--out-dir", "x"],
     "PTQ4VMRecipe: alpha='abc' is not float or None"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit[steps=1.5]", "--out-dir", "x"],
     "VQConfig: steps=1.5 is not int"),
    (["export-onnx", "vim-fm-tiny", "-o", "/tmp"], "-o /tmp: is a folder; give the file to write"),
    (["eval", "vim-fm-tiny", "--stride", "8"], "--stride is for checkpoints"),
    (["export-onnx", "vim-fm-tiny", "-o", "/nonexistent/m.onnx"], "-o /nonexistent/m.onnx: its folder /nonexistent "
                                                                   "does not exist"),
])
def test_cli_errors_exit_nonzero_with_one_line(argv, message, capsys):
    _one_error_line(capsys, main(argv), message)


def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "ckpt.pth"
    bad.write_bytes(b"garbage")
    _one_error_line(capsys, main(["quantize", str(bad), "--recipe", "vimvq-2bit", "--out-dir", str(tmp_path / "o")]),
                    "ckpt.pth is neither a torch checkpoint nor safetensors")


@pytest.mark.fashion_mnist
def test_eval_prints_top1(capsys):
    assert main(["eval", "vim-fm-tiny", "--limit", "200", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.fashion_mnist
def test_quantize_writes_models_onnx_report_and_plots(tmp_path, capsys, freed_memory_calls):
    out = tmp_path / "q"
    assert main(["quantize", "vim-fm-tiny", "--recipe", "vq-kmeans-2bit", "sq-pts-w8a8", "--calib", "16",
                 "--limit", "64", "--out-dir", str(out), "--quiet"]) == 0
    assert freed_memory_calls == ["huge_pages_for_large_tensors", "return_freed_memory"]
    printed = capsys.readouterr().out
    assert "| vq-kmeans-2bit (lowered) |" in printed and "| sq-pts-w8a8 (lowered) |" in printed
    assert {p.name for p in out.iterdir()} == {
        "vq-kmeans-2bit", "sq-pts-w8a8", "report.md", "layer_errors_vq-kmeans-2bit.png", "layer_errors_sq-pts-w8a8.png",
        "token_scales_sq-pts-w8a8.png", "accuracy_vs_bits.png"}
    assert {p.name for p in (out / "sq-pts-w8a8").iterdir()} == {"model.safetensors", "model.onnx"}
    report = (out / "report.md").read_text()
    assert report.startswith(f"# vmq quantize vim-fm-tiny --recipe vq-kmeans-2bit sq-pts-w8a8 --calib 16 --limit 64 "
                             f"--out-dir {out} --quiet\n")  # the whole command, to reproduce the report
    assert "| FP32 |" in report and "![accuracy_vs_bits.png](accuracy_vs_bits.png)" in report
    assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["export-onnx", str(out / "vq-kmeans-2bit" / "model.safetensors"), "-o",
                 str(tmp_path / "again.onnx")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(line.rsplit(" ", 1)[1]) < 1e-3  # onnxruntime vs torch relative error
    saved = str(out / "sq-pts-w8a8" / "model.safetensors")
    assert main(["eval", saved, "--limit", "64", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["bench", "vim-fm-tiny", saved, "--batch", "1", "3", "--reps", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[-1].startswith(saved) and rows[-1].count(" ms (") == 2  # ratios against the first model
    assert main(["bench", "vim-fm-tiny", saved, "--batch", "2", "--reps", "1", "--runtime", "cpp"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert "graphs run by the C++ graph runner" in rows[0] and rows[-1].startswith(saved)


# -- real photographs: the 20 labelled ImageNet JPEGs that ship inside the foolbox wheel ---------------------------
def _checkpoint(path, model) -> Path:
    """As the Vim / VMamba training scripts save them: weights, optimizer state, the argparse namespace."""
    torch.manual_seed(0)
    torch.save({"model": model.state_dict(), "epoch": 0, "args": argparse.Namespace(model="x", lr=1e-3)}, path)
    return path


def test_quantize_mixes_precisions_per_layer(tmp_path, capsys, freed_memory_calls):
    import vmq_fx

    out = tmp_path / "q"
    assert main(["quantize", "vim-fm-tiny", "--recipe", "sq-pts-w4a4", "--layer-recipe", "dt_proj=sq-pts-w8a8",
                 "--keep-float", "x_proj", "--calib", "16", "--limit", "64", "--out-dir", str(out), "--quiet",
                 "--keep-freed-memory"]) == 0
    assert freed_memory_calls == ["huge_pages_for_large_tensors"]  # malloc left as it comes
    loaded = vmq_fx.load_quantized(out / "sq-pts-w4a4" / "model.safetensors")
    int8 = [n for n in loaded.graph.nodes if n.target is torch.ops.vmq.int8_linear.default]
    weight_bits = {str(a.w.target): a.w_bits for a in map(Int8LinearArgs.from_node, int8)}
    float_linears = [n for n in loaded.graph.nodes if n.target is torch.ops.aten.linear.default]
    blocks = len(create_model("vim_fm_tiny").layers)
    # per block: in_proj, out_proj at 4 bits; dt_proj, dt_proj_b at 8; x_proj, x_proj_b and the head stay float
    assert sorted(weight_bits.values()) == [4] * 2 * blocks + [8] * 2 * blocks
    assert len(float_linears) == 2 * blocks + 1
    # each lowered linear's node keeps its layer and recipe through save and load
    recipes = {n.meta["vmq_linear"].role: n.meta["vmq_linear"].recipe for n in int8}
    assert recipes == {"dt_proj": vmq_fx.recipes.from_name("sq-pts-w8a8"), "in_proj": vmq_fx.recipes.from_name("sq-pts-w4a4"), "out_proj": vmq_fx.recipes.from_name("sq-pts-w4a4")}
    assert all("vmq_linear" not in n.meta for n in float_linears)
    assert main(["quantize", "vim-fm-tiny", "--recipe", "sq-pts-w4a4", "--layer-recipe", "dt_proj",
                 "--out-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vmq: error: --layer-recipe 'dt_proj': expected ROLE=RECIPE or MODULE_PATTERN=RECIPE"]


def test_vim_tiny_checkpoint_evaluates_a_folder_of_photos_by_wordnet_id(photos, tmp_path, capsys):
    model = create_model("vim_tiny").eval()
    ckpt = _checkpoint(tmp_path / "vim_t.pth", model)
    assert main(["eval", str(ckpt), "--eval-dir", str(photos / "val"), "--quiet", "--workers", "0"]) == 0
    out = capsys.readouterr()
    assert "top-1" in out.out and "/20)" in out.out
    # The folders' WordNet ids are scored as their ImageNet class indices: a model that always answers the class of
    # the first folder is right on exactly its photos.
    first = sorted(p.name for p in (photos / "val").iterdir())[0]
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[imagenet_synsets().index(first)] = 1.0
    ckpt = _checkpoint(tmp_path / "fixed.pth", model)
    assert main(["eval", str(ckpt), "--eval-dir", str(photos / "val"), "--quiet", "--workers", "0"]) == 0
    n_first = len(list((photos / "val" / first).iterdir()))
    assert f"({n_first}/20)" in capsys.readouterr().out


def test_vim_197_tokens_quantize_from_photos_ptq4vm_and_vq(photos, tmp_path, capsys):
    # Vim-T's width and 197 tokens at 224x224 (two blocks instead of 24 keep the test fast); the configuration is
    # inferred from the checkpoint's shapes; calibration images are drawn from a class-subfolder tree.
    ckpt = _checkpoint(tmp_path / "vim.pth", create_model("vim_tiny", depth=2))
    out = tmp_path / "q"
    assert main(["quantize", str(ckpt), "--recipe", "ptq4vm-w4a8", "vimvq-2bit", "--steps", "2",
                 "--calib-dir", str(photos / "val"), "--calib", "12", "--eval-dir", str(photos / "val"),
                 "--out-dir", str(out), "--quiet", "--workers", "0"]) == 0
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in capsys.readouterr().out.splitlines() if r.startswith("| ")}
    for name in ("ptq4vm-w4a8 (lowered)", "vimvq-2bit (lowered)"):
        torch_top1, ort_top1 = rows[name][0], rows[name][1]
        assert torch_top1 == ort_top1  # onnxruntime agrees with torch on every photo's class
    saved = load_file(out / "ptq4vm-w4a8" / "model.safetensors")
    act_scales = [v for k, v in saved.items() if k.endswith("act_scale")]
    assert len(act_scales) == 12 and all(v.shape == (197,) for v in act_scales)  # one step per token position
    assert "Top-1 on 20 images" in (out / "report.md").read_text()


def test_vmamba_v2v_quantize_without_labels_reports_agreement(photos, tmp_path, capsys):
    # The released v2v layout (stacked per-direction projections, classifier.*) of a VMamba v2v with one block per
    # stage; no labelled folder: the report measures agreement with the FP model on held-out photos.
    from test_checkpoints import official_vmamba_layout

    model = create_model("vmambav2v_tiny", depths=(1, 1, 1, 1)).eval()
    path = tmp_path / "vmamba.pth"
    torch.save({"model": official_vmamba_layout(model.state_dict()), "args": argparse.Namespace(cfg="v2v.yaml")},
               path)
    out = tmp_path / "q"
    assert main(["quantize", str(path), "--recipe", "sq-pts-w8a8", "--calib-dir", str(photos / "calib"),
                 "--calib", "12", "--out-dir", str(out), "--quiet", "--workers", "0"]) == 0
    report = (out / "report.md").read_text()
    assert "agreement with the FP32 model" in report and "8 held-out images" in report
    row = next(r for r in report.splitlines() if r.startswith("| sq-pts-w8a8"))
    torch_cell, ort_cell = (c.strip() for c in row.split("|")[2:4])
    assert float(torch_cell.split()[0]) >= 50.0 and "dB" in torch_cell and "dB" in ort_cell


def test_bad_image_folders_are_one_line_errors(photos, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "vim.pth", create_model("vim_tiny", depth=1))
    base = ["quantize", str(ckpt), "--recipe", "sq-pts-w8a8", "--out-dir", str(tmp_path / "o"), "--quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(capsys, main(base + ["--calib-dir", str(empty)]), "holds no images")
    _one_error_line(capsys, main(base), "needs your images: --calib-dir")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(photos / "calib", corrupt)
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _one_error_line(capsys, main(base + ["--calib-dir", str(corrupt), "--calib", "40"]), "broken.jpg")
    _one_error_line(capsys, main(base + ["--calib-dir", str(photos / "calib"), "--eval-dir", str(photos / "calib")]),
                    "has no class subfolders")
    small = tmp_path / "small"
    small.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32)).save(small / f"{i}.png")
    _one_error_line(capsys, main(base + ["--calib-dir", str(small)]), "32x32", "224x224")
    many = tmp_path / "many"
    for i in range(12):
        (many / f"class{i}").mkdir(parents=True)
        shutil.copy(next((photos / "calib").iterdir()), many / f"class{i}")
    fm = _checkpoint(tmp_path / "fm.pth", create_model("vim_fm_tiny"))
    _one_error_line(capsys, main(["eval", str(fm), "--eval-dir", str(many), "--quiet"]),
                    "12 class folders but the model has 10 classes")


def test_calibration_folders_are_searched_recursively_and_drawn_with_a_seed(photos, tmp_path):
    from vmq_fx.app.images import ImageFiles

    preprocess = create_model("vim_tiny").config.preprocess
    flat = ImageFiles.open(photos / "calib", preprocess)
    nested = ImageFiles.open(photos / "val", preprocess)  # ImageNet layout: one subfolder per class
    assert len(flat.files) == 20 and sorted(f.name for f in nested.files) == sorted(f.name for f in flat.files)
    loop = tmp_path / "tree" / "a"
    loop.mkdir(parents=True)
    shutil.copy(flat.files[0], loop)
    (loop / "up").symlink_to(tmp_path / "tree")  # a link back up the tree is walked once
    assert [f.name for f in ImageFiles.open(tmp_path / "tree", preprocess).files] == [flat.files[0].name]
    draws = {seed: [f.name for f in nested.sample(8, seed).files] for seed in (0, 0, 1)}
    assert len(draws[0]) == 8 and draws[0] != draws[1]
    assert [f.name for f in nested.sample(8, 0).files] == draws[0]  # the same seed draws the same images
    assert len(nested.sample(50, 0).files) == 20


def test_a_mismatched_checkpoint_lists_its_keys_in_the_cli(tmp_path, capsys):
    state = create_model("vim_fm_tiny").state_dict()
    path = tmp_path / "renamed.pth"
    torch.save({"model": {k.replace("mixer.", "mamba."): v for k, v in state.items()}}, path)
    assert main(["eval", str(path), "--config", "vim_fm_tiny", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"vmq: error: {path} does not match VisionMamba:"
    assert err[1].startswith("  missing keys (") and err[1].count("mixer.") == 10 and err[1].endswith("more)")
    assert err[2].startswith("  unexpected keys (") and err[2].count("mamba.") == 10


def test_grayscale_rgba_and_cmyk_photos_are_converted(photos, tmp_path):
    from PIL import Image

    from vmq_fx.app.images import ImageFiles, calibration_batch

    folder = tmp_path / "modes"
    folder.mkdir()
    src = Image.open(next((photos / "calib").iterdir()))
    src.convert("L").save(folder / "gray.png")
    src.convert("RGBA").save(folder / "rgba.png")
    src.convert("CMYK").save(folder / "cmyk.jpg")
    batch = calibration_batch(ImageFiles.open(folder, create_model("vim_tiny").config.preprocess))
    assert batch.shape == (3, 3, 224, 224) and torch.isfinite(batch).all()


def test_export_onnx_with_the_custom_scan(tmp_path, capsys, monkeypatch, ort_custom_ops):
    from vmq_fx.export import ort_ops

    assert main(["export-onnx", "vim-fm-tiny", "-o", str(tmp_path / "m.onnx"), "--onnx-ops", "vmq"]) == 0
    wrote, rel = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "SelectiveScan 16" in wrote and "Scan" not in wrote.replace("SelectiveScan", "")
    assert float(rel.rsplit(" ", 1)[1]) < 1e-4
    monkeypatch.setenv("VMQ_FX_ORT_INCLUDE", str(tmp_path))  # no headers there: refused before any work
    ort_ops.custom_ops_library.cache_clear()
    try:
        _one_error_line(capsys, main(["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--onnx-ops", "vmq",
                                      "--out-dir", str(tmp_path / "o")]), "need onnxruntime's C++ API headers")
    finally:
        ort_ops.custom_ops_library.cache_clear()
    assert not (tmp_path / "o").exists()


def test_the_cli_leaves_logging_as_it_found_it(capsys):
    """main() logs to stderr while it runs and removes its handler when it returns: a library call afterwards (its
    stream closed by then) never writes into the closed one ("--- Logging error ---"), and nothing is filtered."""
    import io
    import logging
    import sys

    logger = logging.getLogger("vmq_fx")
    before = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    old, sys.stderr = sys.stderr, stream
    try:
        assert main(["eval", "no-such-model"]) == 2
    finally:
        sys.stderr = old
    assert "vmq: error:" in stream.getvalue()
    stream.close()
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    torchao_filters = logging.getLogger("torchao").filters
    assert not torchao_filters, torchao_filters  # the CLI's silencing ends with the command
    with capsys.disabled():
        logging.getLogger("vmq_fx.test").warning("after the run")  # must not hit the closed stream
