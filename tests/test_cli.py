import os

import pytest

from vmq_fx.cli import main
from vmq_fx.data import DEFAULT_DATA_DIR


def test_list_shows_configs_and_references(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "vim_tiny" in out and "vmamba_fm_tiny" in out and "vim-fm-tiny" in out


def test_errors_are_one_line_and_nonzero(capsys):
    assert main(["export", "vim_huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmq: error: unknown model 'vim_huge'")
    assert main(["eval", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="Fashion-MNIST not installed (make data)")
def test_eval_prints_top1(capsys):
    assert main(["eval", "vim-fm-tiny", "--limit", "200", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_quantize_writes_models_onnx_report_and_plots(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "vim-fm-tiny", "--recipe", "vq-kmeans-2bit", "sq-pts-w8a8", "--calib", "16",
                 "--limit", "64", "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| vq-kmeans-2bit (lowered) |" in printed and "| sq-pts-w8a8 (lowered) |" in printed
    assert {p.name for p in out.iterdir()} == {
        "vq-kmeans-2bit", "sq-pts-w8a8", "report.md", "layer_errors_vq-kmeans-2bit.png", "layer_errors_sq-pts-w8a8.png",
        "token_scales_sq-pts-w8a8.png", "accuracy_vs_bits.png"}
    assert {p.name for p in (out / "sq-pts-w8a8").iterdir()} == {"model.safetensors", "model.onnx"}
    report = (out / "report.md").read_text()
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


@pytest.mark.parametrize("argv,message", [
    (["quantize", "vim-fm-tiny", "--recipe", "ptq4vm-w9a8", "--out-dir", "x"], "w_bits must be an integer in 2..8"),
    (["quantize", "vim-fm-tiny", "--recipe", "gptq-4bit", "--out-dir", "x"], "unknown recipe 'gptq-4bit'"),
    (["quantize", "vim-huge", "--recipe", "vimvq-2bit", "--out-dir", "x"], "unknown model 'vim-huge'"),
    (["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit", "--out-dir", "x", "--data-dir", "/nonexistent"],
     "Fashion-MNIST"),
    (["export-onnx", "vim-huge", "-o", "x.onnx"], "unknown model 'vim-huge'"),
])
def test_cli_errors_exit_nonzero_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "ckpt.pth"
    bad.write_bytes(b"garbage")
    assert main(["quantize", str(bad), "--config", "vim_fm_tiny", "--recipe", "vimvq-2bit", "--out-dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not read checkpoint" in err and "ckpt.pth" in err
    assert main(["quantize", str(bad), "--recipe", "vimvq-2bit", "--out-dir", str(tmp_path / "o")]) == 2
    assert "needs --config" in capsys.readouterr().err
