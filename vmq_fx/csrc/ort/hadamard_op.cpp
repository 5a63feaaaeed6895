// onnxruntime custom op vmq.HadamardTransform: vmq::hadamard_transform (x @ kron(odd, H) over the last axis by the
// fast Walsh-Hadamard transform, the core the torch op runs: hadamard_core.h) as one node, instead of the Reshape and
// MatMuls of the portable translation.
//
// Inputs: x [..., d] float; odd [m, m]? (absent: m = 1), d = m * 2^k. Output: [..., d].
#include "ops.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../hadamard_core.h"

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.HadamardTransform: " + what);
}

struct HadamardTransformKernel {
  HadamardTransformKernel(const OrtApi&, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto x = vmq_fx::ort::input<float>(ctx, 0), odd = vmq_fx::ort::input<float>(ctx, 1);
    const std::vector<int64_t>& shape = x.shape;
    require(!shape.empty(), "x must have at least one axis");
    const int64_t d = shape.back();
    const int64_t m = odd.data ? (odd.shape.size() == 2 ? odd.shape[0] : -1) : 1;
    require(m >= 1 && (!odd.data || odd.shape[1] == m), "odd must be a square [m, m] matrix");
    require(d % m == 0 && vmq_fx::hadamard::power_of_two(d / m), "the last axis must be m x a power of two");
    const float* xp = x.data;
    const float* op = odd.data;
    float* out = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    const int64_t rows = d > 0 ? x.numel() / d : 0;
    vmq_fx::ort::parallel_chunks(ctx, rows, [&](int64_t begin, int64_t end) {
      std::vector<float> work(m > 1 ? d : 0);
      vmq_fx::hadamard::transform_rows(xp, begin, end, d, op, m, out, work.data());
    });
  }
};

struct HadamardTransformOp : Ort::CustomOpBase<HadamardTransformOp, HadamardTransformKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new HadamardTransformKernel(api, info);
  }
  const char* GetName() const { return "HadamardTransform"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::hadamard_transform_op() {
  static const HadamardTransformOp op;
  return &op;
}
