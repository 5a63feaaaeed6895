"""examples/deploy_onnxruntime.py: an exported file deploys with onnxruntime, numpy and Pillow alone (torch cannot be
imported in its process), with the preprocessing and class names the file's metadata carries."""
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import vmq_fx
from vmq_fx.app.data import FASHION_MNIST_CLASSES, fashion_mnist
from vmq_fx.app.images import imagenet_class_names
from vmq_fx.models import create_model, load_reference

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deploy_onnxruntime.py"


def _deploy(tmp_path, model_file, images, *extra):
    """Run the example where `import torch` fails; return {image path: (class index, name)}."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not available in a deployment')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not available in a deployment" in probe.stderr
    done = subprocess.run([sys.executable, str(EXAMPLE), str(model_file), *map(str, images), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    return {r[0]: (int(r[1].split(":")[0]), r[1].split(":")[1]) for r in rows}


def _torch_top1(model, preprocess, images) -> list[int]:
    x = torch.stack([preprocess(Image.open(p)) for p in images])
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(100)]).argmax(-1).tolist()


def test_photos_classified_as_torch_does_with_the_files_preprocessing_and_names(photos, tmp_path):
    torch.manual_seed(0)
    model = create_model("vim_tiny", depth=2).eval()  # ImageNet-shaped: 224x224 RGB, bicubic resize + crop
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the init's ties
    path = tmp_path / "vim.onnx"
    vmq_fx.export_onnx(model, torch.randn(2, 3, 224, 224), path)
    cfg = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["vmq_fx.pretrained_cfg"])
    assert cfg["input_size"] == [3, 224, 224] and cfg["crop_pct"] == 0.875 and cfg["resize_size"] == 256
    images = sorted((photos / "calib").iterdir())
    got = _deploy(tmp_path, path, images, "--batch", "8")
    expected = _torch_top1(model, model.config.preprocess, images)
    names = imagenet_class_names()
    assert [got[str(p)] for p in images] == [(i, names[i]) for i in expected]


@pytest.mark.fashion_mnist
def test_fashion_mnist_fp_and_w8a8_files_match_torch_on_1000_test_images(tmp_path):
    model = load_reference("vim-fm-tiny")
    pixels, _ = fashion_mnist("test")
    images = []
    for i in range(1000):
        images.append(tmp_path / f"{i:04d}.png")
        Image.fromarray(pixels[i].numpy()).save(images[-1])
    from vmq_fx.app.data import calibration_images

    lowered = vmq_fx.quantize(model, vmq_fx.recipes.from_name("sq-pts-w8a8"), calibration_images(32),
                              progress=False).lowered
    for name, m in (("fp32", model), ("w8a8", lowered)):
        path = tmp_path / f"{name}.onnx"
        vmq_fx.export_onnx(m, torch.randn(2, 1, 28, 28), path)
        got = _deploy(tmp_path, path, images, "--batch", "250")
        expected = _torch_top1(m, model.config.preprocess, images)
        differ = sum(got[str(p)][0] != e for p, e in zip(images, expected))
        assert differ <= 2, (name, differ)
        assert {got[str(p)][1] for p in images} <= set(FASHION_MNIST_CLASSES)


def test_the_custom_op_library_deploys_without_torch(tmp_path, ort_custom_ops):
    """vmq_fx's onnxruntime library links no torch (its ELF needs no libtorch / libc10) and runs the custom-op files
    (FP32: vmq.SelectiveScan and vmq.CausalConv1d; W8A8 also vmq.RmsNorm, vmq.AddRmsNorm and vmq.Int8Linear) in the
    process where torch cannot be imported, classifying as torch does."""
    from vmq_fx.app.data import calibration_images
    from vmq_fx.export.ort_ops import custom_ops_library

    library = custom_ops_library()
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    # only the NEEDED entries: an address in the rest of the section may read "...c10"
    assert needed and not [n for n in needed if "torch" in n or "c10" in n], dynamic
    model = load_reference("vim-fm-tiny")
    lowered = vmq_fx.quantize(model, vmq_fx.recipes.from_name("sq-pts-w8a8"), calibration_images(32),
                              progress=False).lowered
    pixels, _ = fashion_mnist("test")
    images = []
    for i in range(100):
        images.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(pixels[i].numpy()).save(images[-1])
    for name, m, ops, allowed in (("fp32", model, {"SelectiveScan", "CausalConv1d"}, 0),
                                  ("w8a8", lowered, {"SelectiveScan", "CausalConv1d", "RmsNorm", "AddRmsNorm",
                                                     "Int8Linear"}, 2)):
        path = tmp_path / f"{name}.onnx"
        res = vmq_fx.export_onnx(m, torch.randn(2, 1, 28, 28), path, ops="vmq")
        assert {n.op_type for n in onnx.load(path).graph.node if n.domain == "vmq"} == ops, res.op_counts
        got = _deploy(tmp_path, path, images, "--custom-op-library", library, "--threads", "2")
        expected = _torch_top1(m, model.config.preprocess, images)
        assert sum(got[str(p)][0] != e for p, e in zip(images, expected)) <= allowed, name


def test_the_documented_standalone_build_of_the_library_runs_a_file(tmp_path, ort_custom_ops):
    """The one g++ command at the top of csrc/ort/library.cpp (the README's build for a box without Python) names
    every source of the library, compiles, and the library it makes runs an exported file with vmq ops as the
    library vmq_fx builds does."""
    import onnxruntime as ort

    from vmq_fx.export import ort_ops, ort_session

    repo = Path(__file__).resolve().parents[1]
    comment = [line[2:].strip() for line in (repo / "vmq_fx/csrc/ort/library.cpp").read_text().splitlines()
               if line.startswith("//")]
    first = next(i for i, line in enumerate(comment) if line.startswith("g++ "))
    command = []
    for line in comment[first:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    args = shlex.split(" ".join(command))
    assert {a for a in args if a.endswith(".cpp")} == {f"vmq_fx/csrc/{s}" for s in ort_ops._SOURCES}
    library = tmp_path / "libvmq_fx_ort.so"
    args = [str(ort_ops.headers_dir()) if a == "ORT_INCLUDE" else str(library) if a == "libvmq_fx_ort.so" else a
            for a in args if platform.machine() == "x86_64" or not a.startswith("-m")]
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / "fp.onnx"
    vmq_fx.export_onnx(create_model("vim_fm_tiny", depth=1).eval(), torch.randn(2, 1, 28, 28), path, ops="vmq")
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    standalone = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = {standalone.get_inputs()[0].name: np.random.default_rng(0).standard_normal((3, 1, 28, 28), np.float32)}
    got, = standalone.run(None, x)
    want, = ort_session(path).run(None, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_file_with_custom_ops_names_the_library_it_needs(tmp_path):
    model = create_model("vim_fm_tiny", depth=1).eval()
    path = tmp_path / "custom.onnx"
    vmq_fx.export_onnx(model, torch.randn(2, 1, 28, 28), path, ops="vmq")
    meta = {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}
    assert list(meta["vmq_fx.custom_ops"]) == ["vmq"] and meta["vmq_fx.pretrained_cfg"]["input_size"] == [1, 28, 28]
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    done = subprocess.run([sys.executable, str(EXAMPLE), str(path), str(image)], capture_output=True, text=True)
    assert done.returncode == 1 and "--custom-op-library" in done.stderr and len(done.stderr.splitlines()) == 1
