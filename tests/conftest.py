import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mamba_ssm_ref():
    """mamba-ssm's pure-torch oracle. Its package imports the CUDA extension unconditionally; on a CPU machine an
    empty stand-in module lets the pure-torch parts import (tests only)."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    pytest.importorskip("einops")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref


def _executable_isas():
    from vmq_fx.ops import native

    return native.executable_isas()


@pytest.fixture(params=["torch", *_executable_isas()])
def implementation(request):
    """Run a test on the pure-torch implementation and on the C++ kernels of every CPU class this machine can execute
    (an AVX-512 machine runs the avx512, avx2 and generic builds; an AVX2 one avx2 and generic)."""
    from vmq_fx.ops import native

    if request.param == "torch":
        with native.disabled():
            yield request.param
    else:
        # The kernels must build here: a silent fallback would make the "fused" runs test the torch path twice.
        assert native.kernels() is not None, "the fused CPU kernels did not build (see the log)"
        with native.use_isa(request.param) as kernels:
            assert kernels.isa == request.param and native.native_kernels() is kernels
            yield request.param


@pytest.fixture(params=["int_mm", "vnni", "amx", "int16", "float"])
def int8_gemm(request):
    """Run a test with vmq::int8_linear's C++ kernel on each of its integer-product paths (torch._int_mm; the kernel's
    own vpdpbusd product that CPUs with AVX-512 VNNI take; its own product on AMX tiles that CPUs with AMX-INT8 take;
    the int16 product that x86 CPUs without VNNI take; the fp32 GEMM on the dequantized levels that ARM64 CPUs
    take)."""
    import os

    from vmq_fx.ops import native

    if request.param == "int16" and native.selected_isa() == "neon":
        pytest.skip("the int16 product is x86 only (vpmaddwd)")
    if request.param in ("vnni", "amx") and not native.int8_gemm_runs(request.param):
        pytest.skip(f"{native._PATH_NEEDS[request.param]} (build: {native.selected_isa()})")
    if request.param == "int_mm" and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in \
            native.ONEDNN_CAPS_WITHOUT_INT8_DOT:
        pytest.skip("oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA): its int8 products saturate, which is why "
                    "int8_gemm_path never picks torch._int_mm then")
    with native.use_isa(native.selected_isa(), int8_gemm=request.param) as kernels:
        assert kernels.int8_gemm() == request.param
        yield request.param


@pytest.fixture
def ort_custom_ops():
    """The vmq.SelectiveScan onnxruntime library's headers are fetched (`make test` fetches them; a bare checkout is
    told how)."""
    from vmq_fx.export.ort_ops import headers_dir

    if headers_dir() is None:
        pytest.skip("onnxruntime headers not fetched: python -m vmq_fx.export.ort_ops --fetch-headers")


def _foolbox_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox's photos are not installed (pip install --no-deps foolbox==3.3.4; make venv does)")
    return sorted(Path(next(iter(spec.submodule_search_locations))).joinpath("data").glob("imagenet_*.jpg"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """calib/: the 20 photos in one folder; val/<WordNet id>/: the same photos by class (ImageNet-val layout)."""
    root = tmp_path_factory.mktemp("photos")
    from vmq_fx.app.images import imagenet_synsets

    synsets = imagenet_synsets()
    for f in _foolbox_photos():
        cls = int(f.stem.split("_")[2])  # imagenet_<n>_<class index>.jpg
        (root / "calib").mkdir(exist_ok=True)
        shutil.copy(f, root / "calib")
        (root / "val" / synsets[cls]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "val" / synsets[cls])
    return root


def _tiny(name, **kw):
    import torch

    import vmq_fx
    from vmq_fx.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    return model, vmq_fx.export_model(model, torch.randn(2, 1, 28, 28)).module()


@pytest.fixture(scope="module")
def vim():
    """(eager model, exported graph module) of a randomly initialized 2-block vim_fm_tiny."""
    return _tiny("vim_fm_tiny", depth=2)


@pytest.fixture(scope="module")
def vmamba():
    """(eager model, exported graph module) of a randomly initialized vmamba_fm_tiny with one block per stage."""
    return _tiny("vmamba_fm_tiny", depths=(1, 1))


@pytest.fixture(autouse=True)
def freed_memory_calls(monkeypatch):
    """The CLI's allocator settings (``vmq_fx.pt2e.memory``) are process-wide and for good: in the test process their
    calls are recorded instead, by name (``tests/test_memory.py`` makes the settings in fresh interpreters)."""
    import vmq_fx.pt2e.memory

    calls = []
    for name in ("return_freed_memory", "reuse_freed_memory", "huge_pages_for_large_tensors"):
        monkeypatch.setattr(vmq_fx.pt2e.memory, name, lambda *a, name=name, **k: calls.append(name) or True)
    return calls


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """The CLI's ``--threads`` sets torch's thread count for the whole process: restored after each test, so that a
    later test does not run its float sums in another order (MKL's with one thread rounded one level of a rotated
    linear's input the other way, on an AMD EPYC)."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
