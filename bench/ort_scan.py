"""The selective scan in onnxruntime: candidates for a fast path, measured against the fused torch op.

    python bench/ort_scan.py [--threads 1] [--batches 1 8] [--out bench/results/ort_scan.md] [--note ...]

One ``vmq::selective_scan`` at Vim-T shapes (384 channels, 197 tokens, 16 states, z gate, delta bias, softplus), run
three ways in one process, interleaved, medians:

* torch: ``torch.ops.vmq.selective_scan`` (the fused C++ kernel where it is built);
* ORT Scan: the portable export of ``vmq_fx.export_onnx`` (one standard ``Scan``, a recurrence step per token);
* ORT vmq.SelectiveScan: ``export_onnx(..., ops="vmq")``, one node of vmq_fx's compiled onnxruntime custom op
  (``vmq_fx.export.ort_ops``), which calls the fused kernel on onnxruntime's buffers;
* ORT PyOp: a custom op in onnxruntime-extensions' ``ai.onnx.contrib`` domain whose Python body calls the fused kernel.
  onnxruntime-extensions hands a Python op's outputs back as Python lists (``tolist``), which costs more than the scan
  itself.

Needs ``onnxruntime-extensions`` (``pip install --no-deps onnxruntime-extensions``).
"""
from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import interleaved, machine_line  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vmq_fx.ops  # noqa: E402,F401 - registers torch.ops.vmq
from vmq_fx.export.onnx import onnx_translation_table  # noqa: E402

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def inputs(batch: int, d: int = 384, length: int = 197, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"u": [batch, d, length], "delta": [batch, d, length], "A": [d, n], "B": [batch, n, length],
              "C": [batch, n, length], "D": [d], "z": [batch, d, length], "delta_bias": [d]}
    feed = {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}
    feed["A"] = -np.exp(feed["A"]).astype(np.float32)
    return feed


class Scan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z, delta_bias):
        return torch.ops.vmq.selective_scan(u, delta, A, B, C, D, z, delta_bias, True)


def exported_scan_session(feed, folder: Path, threads: int, ops: str):
    """The op exported by vmq_fx's translation (``ops="onnx"``: a standard ``Scan``; ``"vmq"``: one
    ``vmq.SelectiveScan``), in a session from :func:`vmq_fx.export.ort_session`."""
    from vmq_fx.export import ort_session
    from vmq_fx.export.onnx import CUSTOM_DOMAIN

    args = tuple(torch.from_numpy(feed[k]) for k in NAMES)
    ep = torch.export.export(Scan(), args)  # exported per batch size
    path = folder / f"scan_{ops}.onnx"
    program = torch.onnx.export(ep, args, dynamo=True, custom_translation_table=onnx_translation_table(ops),
                                opset_version=18, optimize=False, verbose=False)
    if ops == "vmq":
        program.model.opset_imports[CUSTOM_DOMAIN] = 1
    program.save(str(path))
    return ort_session(path, threads=threads)


@functools.cache  # an op type can be registered with onnxruntime-extensions once per process
def register_pyop() -> None:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f = PyCustomOpDef.dt_float

    @onnx_op(op_type="SelectiveScan", inputs=[f] * 8, outputs=[f, f], attrs={"delta_softplus": PyCustomOpDef.dt_int64})
    def _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=1):
        t = torch.from_numpy
        y, h = torch.ops.vmq.selective_scan(t(u), t(delta), t(A), t(B), t(C), t(D), t(z), t(delta_bias),
                                            bool(delta_softplus))
        return y.numpy(), h.numpy()


def pyop_session(folder: Path, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime_extensions import get_library_path

    register_pyop()
    node = helper.make_node("SelectiveScan", NAMES, ["y", "h"], domain="ai.onnx.contrib", delta_softplus=1)
    graph = helper.make_graph([node], "scan", [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in NAMES],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("y", "h")])
    path = folder / "scan_pyop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("ai.onnx.contrib", 1)]), str(path))
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3, help="timed runs per path and round (3 rounds)")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", default="bench/results/ort_scan.md")
    args = ap.parse_args()
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        sys.exit("bench/ort_scan.py needs onnxruntime-extensions: pip install --no-deps onnxruntime-extensions")
    torch.set_num_threads(args.threads)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for batch in args.batches:
            feed = inputs(batch)
            tensors = tuple(torch.from_numpy(feed[k]) for k in NAMES)
            ref = np.asarray(Scan()(*tensors)[0].double())
            paths = {"ORT standard Scan": exported_scan_session(feed, Path(tmp), args.threads, "onnx"),
                     "ORT vmq.SelectiveScan (compiled custom op)": exported_scan_session(feed, Path(tmp), args.threads,
                                                                                         "vmq"),
                     "ORT PyOp (onnxruntime-extensions)": pyop_session(Path(tmp), args.threads)}
            feeds = {k: {i.name: feed[name] for i, name in zip(sess.get_inputs(), NAMES)} for k, sess in paths.items()}
            runs = {"torch (fused kernel)": lambda: Scan()(*tensors),
                    **{k: (lambda s=sess, f=feeds[k]: s.run(None, f)) for k, sess in paths.items()}}
            errors = {"torch (fused kernel)": 0.0,
                      **{k: float(np.abs(sess.run(None, feeds[k])[0] - ref).max()) for k, sess in paths.items()}}
            medians = interleaved(runs, reps=args.reps)  # load on the machine hits every path alike
            base = medians["torch (fused kernel)"]
            for k, med in medians.items():
                rows.append(f"| {batch} | {k} | {med * 1e3:.1f} | {med / base:.1f}x | {errors[k]:.1e} |")
            print("\n".join(rows[-len(runs):]), flush=True)
    command = "python bench/ort_scan.py " + shlex.join(sys.argv[1:])
    text = "\n".join([
        "# The selective scan in onnxruntime: fast-path candidates",
        "",
        f"Machine: {machine_line()}. Command: `{command}`. {args.note}".rstrip(),
        "",
        "One scan at Vim-T shapes (384 channels x 197 tokens x 16 states, z gate, delta bias, softplus), medians of "
        f"3 interleaved rounds of {args.reps} runs per path in one process; max abs error against the torch op (float64 copy of its "
        "output).",
        "",
        "| batch | path | ms | vs torch | max abs err |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "The compiled custom op (`export_onnx(..., ops=\"vmq\")`, `vmq_fx/export/ort_ops.py`) runs the fused kernel "
        "on onnxruntime's own buffers: the scan costs in onnxruntime what it costs in torch, plus a `Transpose` of y "
        "back to [batch, channels, L]. It ties the file to vmq_fx's library (built against onnxruntime's API headers "
        "from Debian's "
        "`libonnxruntime-dev`, linking torch's C++ libraries), so `export_onnx` keeps the portable standard `Scan` "
        "as its default. The Python custom op of onnxruntime-extensions runs the same kernel but hands its outputs "
        "back as Python lists, which costs several times the scan itself.",
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
