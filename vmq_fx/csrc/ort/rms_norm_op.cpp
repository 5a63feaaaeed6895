// onnxruntime custom op vmq.RmsNorm: vmq::rms_norm (x * (1 / sqrt(mean(x^2) + eps)) * weight over the last axis, the
// core the torch op runs: rms_norm_core.h) as one node, instead of the six operators of the portable translation.
//
// Inputs: x [..., d] float; weight [d]. Attribute: epsilon (float). Output: [..., d].
#include "ops.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../rms_norm_core.h"

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.RmsNorm: " + what);
}

struct RmsNormKernel {
  RmsNormKernel(const OrtApi&, const OrtKernelInfo* info)
      : eps_(Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon")) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto x = vmq_fx::ort::input<float>(ctx, 0), weight = vmq_fx::ort::input<float>(ctx, 1);
    const std::vector<int64_t>& shape = x.shape;
    require(!shape.empty(), "x must have at least one axis");
    const int64_t d = shape.back();
    require(weight.shape == std::vector<int64_t>{d}, "weight must be [d], d the last axis of x");
    const float* xp = x.data;
    const float* wp = weight.data;
    const float eps = eps_;
    float* out = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    const int64_t rows = d > 0 ? x.numel() / d : 0;
    vmq_fx::ort::parallel_chunks(ctx, rows, [&](int64_t begin, int64_t end) {
      vmq_fx::norm::rms_norm_rows(xp, begin, end, d, wp, eps, out);
    });
  }

  float eps_;
};

struct RmsNormOp : Ort::CustomOpBase<RmsNormOp, RmsNormKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new RmsNormKernel(api, info); }
  const char* GetName() const { return "RmsNorm"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::rms_norm_op() {
  static const RmsNormOp op;
  return &op;
}
