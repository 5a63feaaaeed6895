// onnxruntime custom op vmq.SelectiveScan: the fused CPU selective scan of vmq_fx (selective_scan.cpp) behind
// onnxruntime's C API, so that an ONNX file exported with export_onnx(..., scan="vmq") runs the same kernel as torch.
//
// Inputs: u, delta [batch, dim, L]; A [dim, N]; B, C [batch, N, L] or [batch, groups, N, L]; optional D [dim],
// z [batch, dim, L], delta_bias [dim]. Attributes: softplus, reverse (0 / 1). Outputs: y sequence-major,
// [batch, L, dim], and the last state [batch, dim, N], float32. onnxruntime's tensors are wrapped without copies and
// the kernel writes straight into its outputs; it runs on torch's intra-op thread pool (torch.set_num_threads
// applies, not the session's intra_op_num_threads).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <mutex>
#include <optional>
#include <vector>

#include "../kernels.h"

namespace {

constexpr const char* kDomain = "vmq";
constexpr size_t kRequiredInputs = 5;  // u, delta, A, B, C; then D, z, delta_bias

std::optional<at::Tensor> wrap(Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return std::nullopt;
  Ort::ConstValue value = ctx.GetInput(index);
  if (!value) return std::nullopt;  // an optional input left empty
  std::vector<int64_t> shape = value.GetTensorTypeAndShapeInfo().GetShape();
  return at::from_blob(const_cast<float*>(value.GetTensorData<float>()), shape, at::kFloat);
}

at::Tensor output(Ort::KernelContext& ctx, size_t index, std::vector<int64_t> shape) {
  Ort::UnownedValue out = ctx.GetOutput(index, shape);
  return at::from_blob(out.GetTensorMutableData<float>(), shape, at::kFloat);
}

struct SelectiveScanKernel {
  SelectiveScanKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    softplus_ = kernel_info.GetAttribute<int64_t>("softplus") != 0;
    reverse_ = kernel_info.GetAttribute<int64_t>("reverse") != 0;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    at::Tensor in[kRequiredInputs];
    for (size_t i = 0; i < kRequiredInputs; ++i) in[i] = *wrap(ctx, i);
    const int64_t batch = in[0].size(0), dim = in[0].size(1), length = in[0].size(2), n_state = in[2].size(1);
    // the kernel writes y sequence-major; a Transpose after the node in the graph gives [batch, dim, L]
    vmq_fx::selective_scan_cpu_out(in[0], in[1], in[2], in[3], in[4], wrap(ctx, 5), wrap(ctx, 6), wrap(ctx, 7),
                                   softplus_, reverse_, output(ctx, 0, {batch, length, dim}),
                                   output(ctx, 1, {batch, dim, n_state}));
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

// The entry point of onnxruntime's SessionOptions.register_custom_ops_library.
extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // One domain object for the process: onnxruntime keeps a pointer to it in every session that registers it.
  static const SelectiveScanOp op;
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mutex;
  Ort::Status status{nullptr};
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (domain == nullptr) {
      domain = new Ort::CustomOpDomain(kDomain);
      domain->Add(&op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    status = Ort::Status(e.what(), ORT_FAIL);
  }
  return status.release();
}
