// onnxruntime custom op vmq.SelectiveScan: the fused CPU selective scan of vmq_fx (selective_scan_core.h, the core
// the torch op runs too) behind onnxruntime's C API, so that an ONNX file exported with export_onnx(..., scan="vmq")
// runs the same kernel as torch. The library links no torch: onnxruntime's headers and this directory are all it
// needs, and it runs on onnxruntime's intra-op threads (the session's intra_op_num_threads).
//
// Inputs: u, delta [batch, dim, L]; A [dim, N]; B, C [batch, N, L] or [batch, groups, N, L]; optional D [dim],
// z [batch, dim, L], delta_bias [dim]. Attributes: softplus, reverse (0 / 1). Outputs: y sequence-major,
// [batch, L, dim], and the last state [batch, dim, N], float32. onnxruntime's tensors are read in place and the
// kernel writes straight into its outputs.
//
// Built into vmq_fx's onnxruntime library with the other ops (library.cpp registers them).
#include "ops.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../selective_scan_core.h"

namespace {

using vmq_fx::scan::ScanForward;
using vmq_fx::scan::Shapes;
using vmq_fx::scan::Strided3;
using vmq_fx::scan::StridedBC;

constexpr size_t kRequiredInputs = 5;  // u, delta, A, B, C; then D, z, delta_bias

struct Input {
  const float* data = nullptr;  // null: an optional input left empty
  std::vector<int64_t> shape;
};

Input input(Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return {};
  Ort::ConstValue value = ctx.GetInput(index);
  if (!value) return {};
  return {value.GetTensorData<float>(), value.GetTensorTypeAndShapeInfo().GetShape()};
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.SelectiveScan: " + what);
}

struct SelectiveScanKernel {
  SelectiveScanKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    softplus_ = kernel_info.GetAttribute<int64_t>("softplus") != 0;
    reverse_ = kernel_info.GetAttribute<int64_t>("reverse") != 0;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Input u = input(ctx, 0), delta = input(ctx, 1), A = input(ctx, 2), B = input(ctx, 3), C = input(ctx, 4);
    const Input D = input(ctx, 5), z = input(ctx, 6), bias = input(ctx, 7);
    require(u.shape.size() == 3 && delta.shape == u.shape, "u and delta must be [batch, dim, L] alike");
    const int64_t batch = u.shape[0], dim = u.shape[1], length = u.shape[2];
    require(A.shape.size() == 2 && A.shape[0] == dim, "A must be [dim, N]");
    const int64_t n_state = A.shape[1];
    require(B.shape.size() == C.shape.size() && (B.shape.size() == 3 || B.shape.size() == 4),
            "B and C must both be [batch, N, L] or [batch, groups, N, L]");
    const bool grouped = B.shape.size() == 4;
    const int64_t groups = grouped ? B.shape[1] : 1;
    require(B.shape == C.shape && B.shape[0] == batch && B.shape[grouped ? 2 : 1] == n_state &&
                B.shape.back() == length && dim % groups == 0,
            "B and C must be [batch, (groups,) N, L] with groups dividing dim");
    require(!z.data || z.shape == u.shape, "z must have u's shape");
    require((!D.data || D.shape == std::vector<int64_t>{dim}) && (!bias.data || bias.shape == std::vector<int64_t>{dim}),
            "D and delta_bias must be [dim]");

    const Shapes s = Shapes::of<float>(batch, dim, length, n_state, groups);
    // Contiguous tensors: [batch, dim, L] strides (dim * L, L, 1); B / C [batch, (G,) N, L] (a 3-D one is shared by
    // the single group).
    const int64_t sbc = grouped ? groups * n_state * length : n_state * length;
    float* out_rows = ctx.GetOutput(0, {batch, length, dim}).GetTensorMutableData<float>();
    float* last = ctx.GetOutput(1, {batch, dim, n_state}).GetTensorMutableData<float>();
    const ScanForward<float> fwd{s,
                                 Strided3<float>(u.data, dim * length, length, 1, length, reverse_),
                                 Strided3<float>(delta.data, dim * length, length, 1, length, reverse_),
                                 z.data ? Strided3<float>(z.data, dim * length, length, 1, length, reverse_)
                                        : Strided3<float>(),
                                 StridedBC<float>{B.data, sbc, n_state * length, length, 1},
                                 StridedBC<float>{C.data, sbc, n_state * length, length, 1},
                                 A.data,
                                 D.data,
                                 bias.data,
                                 softplus_,
                                 reverse_,
                                 out_rows,
                                 last};
    vmq_fx::ort::parallel_chunks(ctx, fwd.tasks(), [&fwd](int64_t begin, int64_t end) { fwd.run(begin, end); });
  }

  bool softplus_ = false;
  bool reverse_ = false;
};

struct SelectiveScanOp : Ort::CustomOpBase<SelectiveScanOp, SelectiveScanKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new SelectiveScanKernel(api, info); }
  const char* GetName() const { return "SelectiveScan"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::selective_scan_op() {
  static const SelectiveScanOp op;
  return &op;
}
