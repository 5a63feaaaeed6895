// onnxruntime custom ops vmq.RmsNorm and vmq.AddRmsNorm: vmq::rms_norm (x * (1 / sqrt(mean(x^2) + eps)) * weight over
// the last axis) and vmq::add_rms_norm (that of x + residual, and the sum), the core the torch ops run
// (rms_norm_core.h), as one node each instead of the operators of the portable translation.
//
// Inputs: x [..., d] float; (AddRmsNorm: residual, x's shape;) weight [d]. Attribute: epsilon (float). Outputs: the
// norm, x's shape (AddRmsNorm: and the sum).
#include "ops.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../rms_norm_core.h"

namespace {

// Residual: whether the node is AddRmsNorm (inputs x, residual, weight; outputs the norm and the sum).
template <bool Residual>
struct NormKernel {
  NormKernel(const OrtApi&, const OrtKernelInfo* info)
      : eps_(Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon")) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto x = vmq_fx::ort::input<float>(ctx, 0);
    const auto residual = Residual ? vmq_fx::ort::input<float>(ctx, 1) : vmq_fx::ort::Input<float>{};
    const auto weight = vmq_fx::ort::input<float>(ctx, Residual ? 2 : 1);
    const std::vector<int64_t>& shape = x.shape;
    require(!shape.empty(), "x must have at least one axis");
    require(!Residual || residual.shape == shape, "residual must have x's shape");
    const int64_t d = shape.back();
    require(weight.shape == std::vector<int64_t>{d}, "weight must be [d], d the last axis of x");
    const float* xp = x.data;
    const float* rp = residual.data;
    const float* wp = weight.data;
    const float eps = eps_;
    float* out = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    float* sum = Residual ? ctx.GetOutput(1, shape).GetTensorMutableData<float>() : nullptr;
    const int64_t rows = d > 0 ? x.numel() / d : 0;
    vmq_fx::ort::parallel_chunks(ctx, rows, [&](int64_t begin, int64_t end) {
      if (Residual)
        vmq_fx::norm::add_rms_norm_rows(xp, rp, begin, end, d, wp, eps, out, sum);
      else
        vmq_fx::norm::rms_norm_rows(xp, begin, end, d, wp, eps, out);
    });
  }

  static void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(std::string(Residual ? "vmq.AddRmsNorm: " : "vmq.RmsNorm: ") + what);
  }

  float eps_;
};

template <bool Residual>
struct NormOp : Ort::CustomOpBase<NormOp<Residual>, NormKernel<Residual>> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new NormKernel<Residual>(api, info);
  }
  const char* GetName() const { return Residual ? "AddRmsNorm" : "RmsNorm"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return Residual ? 3 : 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return Residual ? 2 : 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::rms_norm_op() {
  static const NormOp<false> op;
  return &op;
}

const OrtCustomOp* vmq_fx::ort::add_rms_norm_op() {
  static const NormOp<true> op;
  return &op;
}
