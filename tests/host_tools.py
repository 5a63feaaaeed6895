"""System tools some tests need (not a test module)."""
import os
import shutil

import pytest


def required_tool(name: str, package: str) -> str:
    """The path of ``name``; skipped without it, and failed under CI (``make test`` installs ``package``)."""
    path = shutil.which(name)
    if path is None:
        msg = f"no {name}: apt-get install {package} (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
