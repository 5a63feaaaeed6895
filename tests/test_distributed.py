"""Several processes under torchrun (gloo on this CPU) against one process: the same evaluation, by whole batches."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vmq_fx import distributed
from vmq_fx.app.cli import main


@pytest.mark.parametrize("n,batch,size", [(1100, 500, 2), (1100, 500, 3), (30, 64, 2), (0, 8, 2), (10, 1, 4)])
def test_batch_shards_are_whole_batches_in_order(n, batch, size, monkeypatch):
    shards = []
    for r in range(size):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: size)
        shards.append(distributed.batch_shard(n, batch))
    assert [i for s in shards for i in s] == list(range(n))  # a partition, in rank order
    for s in shards:  # each starts on a batch boundary and ends on one (or at n)
        assert s.start % batch == 0 and (s.stop % batch == 0 or s.stop == n)
    counts = [len(range(s.start, s.stop, batch)) for s in shards]
    assert max(counts) - min(counts) <= 1  # batches dealt out evenly


def _torchrun(*args) -> str:
    """stdout of ``torchrun --standalone --nproc_per_node 2 ARGS`` (a script, or ``-m module ...``), which must
    succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # A process that aborts in native code (it happened twice in CI, never here) then prints its Python stack.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    # The processes' own last lines come before torchrun's summary of which one failed: keep both.
    lines = [line for line in done.stderr.splitlines() if "Warning" not in line]
    assert done.returncode == 0, "\n".join(lines[-80:])
    return done.stdout


def _counts(text: str) -> tuple[int, int]:
    correct, total = re.search(r"\((\d+)/(\d+)\)", text).groups()
    return int(correct), int(total)


@pytest.mark.fashion_mnist
def test_eval_under_torchrun_equals_one_process(tmp_path, capsys):
    """600 Fashion-MNIST test images (batches of 500: one process takes 500, the other 100), and a labelled folder of
    40 images (batches of 64: the second process has none): the counts of one process, printed once."""
    from vmq_fx.app.data import fashion_mnist

    pixels, labels = fashion_mnist("test")
    for i in range(40):
        folder = tmp_path / "images" / f"class{int(labels[i])}"  # sorted: the label order
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i].numpy()).save(folder / f"{i:02d}.png")
    for args in (["eval", "vim-fm-tiny", "--limit", "600"],
                 ["eval", "vim-fm-tiny", "--eval-dir", str(tmp_path / "images")]):
        assert main([*args, "--threads", "1", "--quiet"]) == 0
        alone = capsys.readouterr().out
        together = _torchrun("-m", "vmq_fx.app.cli", *args, "--threads", "1", "--quiet")
        assert len(together.strip().splitlines()) == 1 and "(2 processes)" in together  # rank 0 reports
        assert _counts(together) == _counts(alone)
        assert _counts(alone)[1] == (600 if "--limit" in args else 40)


@pytest.mark.parametrize("command", [["export-onnx", "vim-fm-tiny", "-o", "m.onnx"], ["bench", "vim-fm-tiny"]])
def test_commands_that_do_not_run_distributed_refuse_torchrun(command, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not run under torchrun yet" in err[0] and "vmq quantize" in err[0], err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_merged_histograms_keep_every_count_on_the_coarsest_grid():
    from vmq_fx.pt2e.observers.lp_search import RowHistograms

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4000, generator=g) * torch.tensor([[1.0], [5.0], [0.1]])
    parts = [RowHistograms(64) for _ in range(2)]
    parts[0].add(x[:, :1000])
    parts[1].add(x[:, 1000:] * 3)  # a wider range: its grid is the coarser one
    merged = RowHistograms.merged(64, [p.state() for p in parts])
    assert torch.equal(merged.counts.sum(1), torch.full((3,), 4000.0))
    assert torch.equal(merged.width, parts[1].width) and torch.equal(merged.start, parts[1].start)  # held it already
    assert bool((merged.counts >= parts[1].counts).all())  # the coarsest histogram's bins nest: kept as they are
    # the finer one's values land within one of its own bins of their place: the merged cumulative counts are those
    # of one histogram of all the values, up to the counts of one fine bin's width at each edge
    whole = RowHistograms(64)
    whole.start, whole.width, whole.counts = merged.start.clone(), merged.width.clone(), torch.zeros(3, 64)
    whole.add(torch.cat([x[:, :1000], x[:, 1000:] * 3], 1))
    assert torch.equal(whole.width, merged.width)
    fine = parts[0].counts.amax(1, keepdim=True)  # the most values one fine bin holds
    assert bool(((merged.counts.cumsum(1) - whole.counts.cumsum(1)).abs() <= fine).all())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What tests/distributed_calibration.py saves when run by torchrun with 2 processes."""
    out = tmp_path_factory.mktemp("torchrun") / "two.pt"
    _torchrun(str(Path(__file__).parent / "distributed_calibration.py"), str(out))
    return torch.load(out)


@pytest.mark.fashion_mnist
def test_calibration_under_torchrun_matches_one_process(two_processes):
    """SmoothQuant + PTS calibration of vim-fm-tiny on 8 batches: 2 processes of 4 batches each against one process.
    The maxima and the smoothing scales are exact; the step sizes come from merged histograms, as close to one
    process's as one process's are to themselves with another batch size (measured: max 3.0 % / mean 0.32 % apart,
    against 2.1 % / 0.20 % for batches of 16 instead of 8). The two processes read the images from a map-style
    dataset, each its own 4 batches only; one process from a tensor."""
    from distributed_calibration import calibrated_statistics

    two, one = dict(two_processes["calibration"]), calibrated_statistics()
    assert two.pop("read") == [list(range(32)), list(range(32, 64))]
    assert one.keys() == two.keys() and len(one) == 48
    rel = []
    for name in one:
        for key in ("min", "max", "channel_absmax", "smooth"):
            assert torch.equal(one[name][key], two[name][key]), (name, key)
        rel.append(((one[name]["scale"] - two[name]["scale"]).abs() / one[name]["scale"]).double())
    rel = torch.cat(rel)
    assert rel.max() < 0.05 and rel.mean() < 0.005, (float(rel.max()), float(rel.mean()))


@pytest.mark.fashion_mnist
def test_klt_moments_under_torchrun_match_one_process(two_processes):
    """The second moments the KLT rotations are fitted on are summed over both processes: one process's up to float64
    reassociation (each process's own half would be about half of it). The rotations themselves are not compared:
    eigenvectors of near-equal eigenvalues turn with any rounding (batches of 8 against 16 in one process already
    give other ones for vim-fm-tiny's in_proj)."""
    from distributed_calibration import klt_moments

    two, one = two_processes["klt"], klt_moments()
    assert len(one) == len(two) == 48
    for a, b in zip(one, two):
        assert a.dtype == torch.float64 and ((a - b).norm() / a.norm()).item() < 1e-12


@pytest.mark.fashion_mnist
def test_outlier_channels_under_torchrun_match_one_process(two_processes):
    """The channel maxima that pick the outlier channels and their per-token ranges are combined exactly; their 8-bit
    steps, searched by one process and adopted by the other, as close as the other step sizes (above)."""
    from distributed_calibration import outlier_statistics

    two, one = two_processes["outliers"], outlier_statistics()
    assert one.keys() == two.keys() and len(one) == 48
    for name in one:
        for key in ("mask", "min", "max"):
            assert torch.equal(one[name][key], two[name][key]), (name, key)
        rel = (one[name]["scale"] - two[name]["scale"]).abs() / one[name]["scale"]
        assert rel.max() < 0.05, (name, float(rel.max()))


@pytest.mark.fashion_mnist
def test_block_optimizations_under_torchrun_match_one_process(two_processes):
    """JLSS and ViM-VQ with each process holding half of the captures: the same mini-batches, the loss of each half
    weighted by its share, the gradients summed. ViM-VQ ends where one process does (to float rounding); JLSS's
    first block starts from the same loss and ends within 1e-5 of it, and the later blocks drift by Adam's first
    steps, which move each parameter by about its learning rate in the direction of its gradient's sign (a gradient
    near zero may round either way): measured, the learned tensors' largest differences are at most 2.5 % of their
    largest values, the block losses within 0.5 %. The two processes read the images from a map-style dataset, one
    process from a tensor: each process read its half of the dataset, and nothing else."""
    from distributed_calibration import block_optimizations

    one = block_optimizations()
    assert two_processes["read"] == {name: [list(range(32)), list(range(32, 64))] for name in ("jlss", "vimvq")}
    for name in ("jlss", "vimvq"):
        a, b = one[name], two_processes[name]
        assert a["params"].keys() == b["params"].keys() and len(a["before"]) == len(b["before"]) == 8
        # each learned tensor's largest difference, relative to its largest value
        rel = torch.stack([(a["params"][k] - b["params"][k]).abs().max() / a["params"][k].abs().max()
                           for k in a["params"]])
        losses = [abs(x - y) / x for x, y in zip(a["before"] + a["after"], b["before"] + b["after"])]
        if name == "vimvq":
            assert max(losses) < 1e-5 and rel.max() < 1e-4, (max(losses), float(rel.max()))
        else:
            assert abs(a["before"][0] - b["before"][0]) / a["before"][0] < 1e-6
            assert abs(a["after"][0] - b["after"][0]) / a["after"][0] < 1e-4
            assert max(losses) < 0.02 and rel.max() < 0.05 and rel.median() < 1e-3, (max(losses), float(rel.max()),
                                                                                       float(rel.median()))


def _table(report: str) -> dict[str, str]:
    """{model: top-1} of a quantize report's table."""
    rows = [line.split("|")[1:3] for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    return {name.strip(): top1.strip() for name, top1 in rows[1:]}


@pytest.mark.fashion_mnist
def test_quantize_under_torchrun_writes_once_what_one_process_does(tmp_path, capsys):
    """vmq quantize with a short ViM-VQ on 2 processes: one report and one set of files (rank 0's), and the scores of
    one process (ViM-VQ's calibration is the weights' k-means, the same in every process; the optimization's sums
    over the processes are tested above)."""
    args = ["quantize", "vim-fm-tiny", "--recipe", "vimvq-2bit[steps=1]", "--calib", "32", "--limit", "600",
            "--no-onnx", "--threads", "1", "--quiet"]
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert _torchrun("-m", "vmq_fx.app.cli", *args, "--out-dir", str(tmp_path / "two")).count("wrote ") == 1  # rank 0
    files = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    one, two = ((tmp_path / d / "report.md").read_text() for d in ("one", "two"))
    assert "2 processes (torchrun)" in two
    assert _table(one) == _table(two) and set(_table(one)) == {"FP32", "vimvq-2bit[steps=1] (lowered)"}
