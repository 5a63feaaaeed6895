"""The flow on a CUDA GPU: the vmq ops and whole lowered models on CUDA tensors against the same ops and models on CPU
(the C++ kernels, themselves tested against float64 and mamba-ssm's references in the CPU suite).

Marked ``cuda``; they run where a GPU is, with the Triton kernels compiled rather than interpreted::

    TRITON_INTERPRET=0 pytest -m cuda tests/test_kernels.py tests/test_cuda.py

(``bench/gpu_session.sh`` runs that). Elsewhere they are skipped.
"""
import copy
import os

import pytest
import torch

import vmq_fx
from vmq_fx.models import create_model, load_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU, with the Triton kernels compiled (TRITON_INTERPRET=0)"),
]
DEVICE = "cuda"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cuda(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv1d_on_cuda_matches_cpu(reverse):
    g = _gen(1)
    x, w, b = torch.randn(2, 37, 48, generator=g), torch.randn(48, 4, generator=g), torch.randn(48, generator=g)
    args = (x, w, b, True, reverse)
    out = torch.ops.vmq.causal_conv1d(*_cuda(args))
    assert out.device.type == DEVICE
    torch.testing.assert_close(out.cpu(), torch.ops.vmq.causal_conv1d(*args), rtol=1e-5, atol=1e-5)


def test_norms_and_hadamard_on_cuda_match_cpu():
    g = _gen(2)
    x, r, w = torch.randn(2, 17, 96, generator=g), torch.randn(2, 17, 96, generator=g), torch.rand(96, generator=g)
    torch.testing.assert_close(torch.ops.vmq.rms_norm(*_cuda((x, w, 1e-5))).cpu(), torch.ops.vmq.rms_norm(x, w, 1e-5),
                               rtol=1e-5, atol=1e-5)
    out, total = torch.ops.vmq.add_rms_norm(*_cuda((x, r, w, 1e-5)))
    ref_out, ref_total = torch.ops.vmq.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(total.cpu(), ref_total)
    odd = torch.linalg.qr(torch.randn(3, 3, generator=g)).Q.contiguous()
    y = torch.randn(5, 96, generator=g)
    torch.testing.assert_close(torch.ops.vmq.hadamard_transform(*_cuda((y, odd))).cpu(),
                               torch.ops.vmq.hadamard_transform(y, odd), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lowered_models():
    """The reference models and their lowered W8A8, W4A8 and VQ 2-bit forms, calibrated on CPU on random images."""
    calib = torch.randn(8, 1, 28, 28, generator=_gen(0))
    chosen = {"w8a8": vmq_fx.recipes.smoothquant_pts(8, 8), "w4a8": vmq_fx.recipes.smoothquant_pts(4, 8),
              "vq2": vmq_fx.recipes.vq_kmeans(2, kmeans_iters=3)}
    models = {}
    for name in ("vim-fm-tiny", "vmamba-fm-tiny"):
        model = load_reference(name)
        models[name, "fp32"] = model
        for recipe, r in chosen.items():
            models[name, recipe] = vmq_fx.quantize(model, r, calib, progress=False).lowered
    return models


@pytest.mark.parametrize("recipe", ["fp32", "w8a8", "w4a8", "vq2"])
@pytest.mark.parametrize("name", ["vim-fm-tiny", "vmamba-fm-tiny"])
@torch.no_grad()
def test_models_on_cuda_match_cpu(name, recipe, lowered_models):
    """The same model moved to the GPU (``.to("cuda")``: every weight, scale and code goes with it) gives the CPU's
    logits up to float rounding (the integer levels are the same but where a product rounds across a tie)."""
    model = lowered_models[name, recipe]
    x = torch.randn(16, 1, 28, 28, generator=_gen(3))
    ref = model(x)
    out = copy.deepcopy(model).to(DEVICE)(x.to(DEVICE)).cpu()
    assert _rel(out, ref) < 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 15 / 16


@torch.no_grad()
def test_fp16_vim_on_cuda_is_close_to_fp32_on_cpu():
    torch.manual_seed(0)
    model = create_model("vim_tiny", depth=2).eval()
    x = torch.randn(2, 3, 224, 224, generator=_gen(4))
    out = copy.deepcopy(model).half().to(DEVICE)(x.half().to(DEVICE)).float().cpu()
    assert _rel(out, model(x)) < 2e-2


@torch.no_grad()
def test_quantize_with_the_model_on_cuda():
    """Calibration, lowering and the lowered model all on the GPU: the result agrees with the CPU-calibrated one."""
    model = load_reference("vim-fm-tiny")
    calib = torch.randn(8, 1, 28, 28, generator=_gen(0))
    recipe = vmq_fx.recipes.smoothquant_pts(8, 8)
    on_gpu = vmq_fx.quantize(copy.deepcopy(model).to(DEVICE), recipe, calib.to(DEVICE), progress=False).lowered
    on_cpu = vmq_fx.quantize(model, recipe, calib, progress=False).lowered
    x = torch.randn(16, 1, 28, 28, generator=_gen(5))
    assert _rel(on_gpu(x.to(DEVICE)).cpu(), on_cpu(x)) < 1e-2
