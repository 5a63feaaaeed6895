// The ops of vmq_fx's onnxruntime custom-op library (domain "vmq"), registered together by library.cpp.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <vector>

namespace vmq_fx::ort {

const OrtCustomOp* selective_scan_op();     // selective_scan_op.cpp
const OrtCustomOp* int8_linear_op();     // int8_linear_op.cpp
const OrtCustomOp* causal_conv1d_op();   // causal_conv1d_op.cpp
const OrtCustomOp* hadamard_transform_op();  // hadamard_op.cpp
const OrtCustomOp* rms_norm_op();        // rms_norm_op.cpp
const OrtCustomOp* add_rms_norm_op();    // rms_norm_op.cpp

// One input of a kernel, read in place; data is null for an optional input left empty.
template <typename T>
struct Input {
  const OrtValue* value = nullptr;
  const T* data = nullptr;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

template <typename T>
Input<T> input_of(Ort::ConstValue value) {
  if (!value) return {};
  return {value, value.GetTensorData<T>(), value.GetTensorTypeAndShapeInfo().GetShape()};
}

template <typename T>
Input<T> input(Ort::KernelContext& ctx, size_t index) {
  return index < ctx.GetInputCount() ? input_of<T>(ctx.GetInput(index)) : Input<T>{};
}

// Input `index` when it is a constant initializer of the graph (an exported file's weights and quantization
// parameters), read once when the session creates the kernel; empty otherwise.
template <typename T>
Input<T> constant_input(const Ort::ConstKernelInfo& info, size_t index) {
  int is_constant = 0;
  Ort::ConstValue value = info.GetTensorConstantInput(index, &is_constant);
  return is_constant ? input_of<T>(value) : Input<T>{};
}

// Input `index` of this call: `constant` where the kernel read it at creation, else read into `fetched`. Reading an
// input's data and shape through the C API costs ~0.1 us, which for vim-fm-tiny's linears at batch 1 (seven constant
// inputs, 2-10 us a call) is worth skipping.
template <typename T>
const Input<T>& resolved_input(Ort::KernelContext& ctx, size_t index, const Input<T>& constant, Input<T>& fetched) {
  if (constant.value) return constant;
  fetched = input<T>(ctx, index);
  return fetched;
}

// run(begin, end) over [0, tasks) in up to 64 contiguous chunks on onnxruntime's intra-op threads (the session's
// intra_op_num_threads); a chunk's tasks run on one thread, which keeps its buffers across them.
template <typename Run>
void parallel_chunks(Ort::KernelContext& ctx, int64_t tasks, Run&& run) {
  struct Work {
    Run* run;
    int64_t tasks, chunks;
  } work{&run, tasks, std::min<int64_t>(tasks, 64)};
  auto run_chunk = [](void* data, size_t chunk) {
    const Work& w = *static_cast<const Work*>(data);
    const auto c = static_cast<int64_t>(chunk);
    (*w.run)(w.tasks * c / w.chunks, w.tasks * (c + 1) / w.chunks);
  };
  if (work.chunks > 1) {
    ctx.ParallelFor(run_chunk, static_cast<size_t>(work.chunks), 0, &work);
  } else if (work.chunks == 1) {
    run(0, tasks);
  }
}

}  // namespace vmq_fx::ort
