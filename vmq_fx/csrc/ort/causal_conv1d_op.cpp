// onnxruntime custom op vmq.CausalConv1d: vmq::causal_conv1d (depthwise (anti-)causal convolution + optional SiLU, the
// core the torch op runs: causal_conv1d_core.h) as one node, instead of the Pad, K shifted Slice windows, products and
// sums of the portable translation.
//
// Inputs: x [batch, L, channels] float; taps [K, channels] (the weight transposed by the graph, folded at load);
// bias [channels]?. Attributes: silu, reverse (0 / 1); offset (optional, default 0): x is wider, [batch, L, C], and
// the convolution reads its channels [offset, offset + channels) in place (the exporter passes the tensor a Split
// along the channels was made from, so onnxruntime does not copy the slice). Output: [batch, L, channels].
#include "ops.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../causal_conv1d_core.h"

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.CausalConv1d: " + what);
}

struct CausalConv1dKernel {
  CausalConv1dKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    silu_ = kernel_info.GetAttribute<int64_t>("silu") != 0;
    reverse_ = kernel_info.GetAttribute<int64_t>("reverse") != 0;
    try {
      offset_ = kernel_info.GetAttribute<int64_t>("offset");
      windowed_ = true;
    } catch (const Ort::Exception&) {  // absent: x has the taps' channels
    }
    require(offset_ >= 0, "offset must be >= 0");
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto x = vmq_fx::ort::input<float>(ctx, 0), taps = vmq_fx::ort::input<float>(ctx, 1);
    const auto bias = vmq_fx::ort::input<float>(ctx, 2);
    const std::vector<int64_t>& shape = x.shape;
    const std::vector<int64_t>& taps_shape = taps.shape;
    require(shape.size() == 3, "x must be [batch, L, channels]");
    require(taps_shape.size() == 2 && taps_shape[0] >= 1 && taps_shape[0] <= vmq_fx::conv::kMaxWidth,
            "the taps must be [K, channels] with K from 1 to 8");
    const int64_t batch = shape[0], length = shape[1], width = shape[2], channels = taps_shape[1];
    require(windowed_ ? offset_ + channels <= width : channels == width,
            windowed_ ? "x must hold channels [offset, offset + channels), the taps' channels from offset"
                      : "the taps must be [K, channels] with x's channels");
    require(!bias.data || bias.shape == std::vector<int64_t>{channels}, "bias must be [channels]");
    const float* xp = x.data + offset_;
    const float* wp = taps.data;
    const float* bp = bias.data;
    float* out = ctx.GetOutput(0, {batch, length, channels}).GetTensorMutableData<float>();
    const int64_t kernel = taps_shape[0];
    const bool silu = silu_, reverse = reverse_;
    vmq_fx::ort::parallel_chunks(ctx, vmq_fx::conv::conv_tasks(batch, length), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task)
        vmq_fx::conv::conv_task(task, xp, length * width, width, length, channels, wp, kernel, bp, silu, reverse, out);
    });
  }

  bool silu_ = false;
  bool reverse_ = false;
  int64_t offset_ = 0;
  bool windowed_ = false;  // the offset attribute is given
};

struct CausalConv1dOp : Ort::CustomOpBase<CausalConv1dOp, CausalConv1dKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new CausalConv1dKernel(api, info); }
  const char* GetName() const { return "CausalConv1d"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::causal_conv1d_op() {
  static const CausalConv1dOp op;
  return &op;
}
