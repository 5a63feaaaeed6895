import sys
import types

import pytest


@pytest.fixture(scope="session")
def mamba_ssm_ref():
    """mamba-ssm's pure-torch oracle. Its package imports the CUDA extension unconditionally; on a CPU machine an
    empty stand-in module lets the pure-torch parts import (tests only)."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    pytest.importorskip("einops")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref


@pytest.fixture(params=["fused", "torch"])
def implementation(request):
    """Run a test on the fused C++ CPU kernels and again on the pure-torch fallback."""
    from vmq_fx.ops import native

    if request.param == "torch":
        with native.disabled():
            yield request.param
    else:
        # The kernels must build here: a silent fallback would make the "fused" runs test the torch path twice.
        assert native.native_kernels() is not None, "the fused CPU kernels did not build (see the log)"
        yield request.param


@pytest.fixture
def ort_custom_ops():
    """The vmq.SelectiveScan onnxruntime library's headers are fetched (`make test` fetches them; a bare checkout is
    told how)."""
    from vmq_fx.export.ort_ops import headers_dir

    if headers_dir() is None:
        pytest.skip("onnxruntime headers not fetched: python -m vmq_fx.export.ort_ops --fetch-headers")
