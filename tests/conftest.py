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
