import os

# The Triton kernels are tested in Triton's interpreter on CPU tensors; the flag must be set before any kernel is
# decorated (tests/test_kernels.py, and the doctests, which import the package first), and it changes nothing else.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from _pytest.doctest import DoctestItem

# Doctests that read Fashion-MNIST (the package's own loaders).
_DATA_FUNCTIONS = ("fashion_mnist(", "calibration_images(", "evaluate(")


def _have_fashion_mnist() -> bool:
    from vmq_fx.app.data import data_directory

    return (data_directory() / "t10k-labels-idx1-ubyte.gz").is_file() or (
        data_directory() / "t10k-labels-idx1-ubyte").is_file()


def _needs_fashion_mnist(item) -> bool:
    if isinstance(item, DoctestItem):
        return any(f in ex.source for ex in item.dtest.examples for f in _DATA_FUNCTIONS)
    return "fashion_mnist" in item.keywords


def pytest_collection_modifyitems(config, items):
    """Tests marked ``fashion_mnist`` (and doctests that load it) need the dataset where the package looks for it
    (``$VMQ_DATA_DIR`` or the Debian package's directory); without it they are skipped, and ``-ra`` lists them."""
    if _have_fashion_mnist():
        return
    skip = pytest.mark.skip(reason="Fashion-MNIST not installed (make data, or set VMQ_DATA_DIR)")
    for item in items:
        if _needs_fashion_mnist(item):
            item.add_marker(skip)
