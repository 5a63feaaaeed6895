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
    assert "unknown reference model" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="Fashion-MNIST not installed (make data)")
def test_eval_prints_top1(capsys):
    assert main(["eval", "vim-fm-tiny", "--limit", "200", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
