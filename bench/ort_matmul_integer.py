"""onnxruntime's MatMulInteger in the three operand types an exported int8 linear could use: speed against its fp32
MatMul, and exactness at the largest products (where AVX2 without VNNI saturates uint8 x int8).

    python bench/ort_matmul_integer.py [--out bench/results/ort_matmul_integer.md] [--note '...']

Shapes: Vim-T in_proj at batch 8 (M 1576, K 192, N 768); one thread; medians of 15 runs per variant, interleaved
rounds. Exactness: every activation at its largest level against weights of +-127 (or 255 / 0 for uint8), compared
with an int64 numpy product. The results file keeps one section per CPU class; a run replaces its own class's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import cpu_class, interleaved, machine_line, write_class_section  # noqa: E402

M, K, N = 1576, 192, 768
# name -> (activation dtype, weight dtype, weight offset / b_zero_point, activation range)
FORMS = {
    "uint8 x int8": (np.uint8, np.int8, 0),
    "int8 x int8 (activations shifted by -128)": (np.int8, np.int8, 0),
    "uint8 x uint8 (weights shifted by +128, b_zero_point 128)": (np.uint8, np.uint8, 128),
}


def _session(model_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _model(a_type, w, zero_point):
    import onnx
    from onnx import helper

    elem = onnx.helper.np_dtype_to_tensor_dtype
    inits = [onnx.numpy_helper.from_array(w, "w")]
    inputs = ["a", "w"]
    if zero_point:
        inits += [onnx.numpy_helper.from_array(np.zeros((), np.uint8), "a_zp"),
                  onnx.numpy_helper.from_array(np.array(zero_point, np.uint8), "w_zp")]
        inputs += ["a_zp", "w_zp"]
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"])], "g",
                              [helper.make_tensor_value_info("a", elem(np.dtype(a_type)), [None, K])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [None, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def main():
    import onnxruntime as ort
    from onnx import helper, numpy_helper, TensorProto

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/ort_matmul_integer.md")
    p.add_argument("--note", default="")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w_signed = rng.integers(-127, 128, (K, N)).astype(np.int8)
    variants, exact = {}, {}
    for name, (a_type, w_type, zp) in FORMS.items():
        w = (w_signed.astype(np.int16) + zp).astype(w_type)
        sess = _session(_model(a_type, w, zp))
        info = np.iinfo(a_type)
        a = rng.integers(info.min, info.max + 1, (M, K)).astype(a_type)
        variants[name] = lambda s=sess, a=a: s.run(None, {"a": a})
        # the largest products: activations at the top level, weights all +127 or all -127 per column
        a_max = np.full((64, K), info.max, a_type)
        w_ext = np.where(np.arange(N) % 2, 127, -127).astype(np.int16)[None, :].repeat(K, 0)
        s_ext = _session(_model(a_type, (w_ext + zp).astype(w_type), zp))
        got = s_ext.run(None, {"a": a_max})[0]
        exact[name] = bool((got == a_max.astype(np.int64) @ w_ext.astype(np.int64)).all())
    wf = rng.standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(wf, "w")])
    fsess = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    af = rng.standard_normal((M, K)).astype(np.float32)
    variants["fp32 MatMul"] = lambda: fsess.run(None, {"a": af})
    t = interleaved(variants, 15)
    lines = [f"## {cpu_class()}", "",
             f"Machine: {machine_line()}; onnxruntime {ort.__version__}. Command: `python bench/ort_matmul_integer.py "
             f"{shlex.join(sys.argv[1:])}`. {args.note}".rstrip(), "",
             f"M {M}, K {K}, N {N} (Vim-T in_proj, batch 8), one thread.", "",
             "| operands | ms | vs fp32 MatMul | exact at the largest products |", "|---|---|---|---|"]
    for name in variants:
        lines.append(f"| {name} | {t[name] * 1e3:.2f} | {t['fp32 MatMul'] / t[name]:.2f}x | "
                     f"{'-' if name not in exact else 'yes' if exact[name] else '**no**'} |")
    write_class_section(args.out, "# onnxruntime MatMulInteger: operand types, speed and exactness\n\nOne section per "
                        "CPU class measured; a re-run replaces its own class's section.", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
