// onnxruntime custom op vmq.SelectiveScan: the fused CPU selective scan of vmq_fx (selective_scan_core.h, the core
// the torch op runs too) behind onnxruntime's C API, so that an ONNX file exported with export_onnx(..., ops="vmq")
// runs the same kernel as torch. The library links no torch: onnxruntime's headers and this directory are all it
// needs, and it runs on onnxruntime's intra-op threads (the session's intra_op_num_threads).
//
// Inputs: u, delta [batch, dim, L]; A [dim, N]; B, C [batch, N, L] or [batch, groups, N, L]; optional D [dim],
// z [batch, dim, L], delta_bias [dim]. Attributes: softplus, reverse (0 / 1); sequence_major (optional): the indices
// of the inputs among u, delta, B, C (3-D) and z that come sequence-major instead, [batch, L, dim] / [batch, L, N]
// (the exporter passes the tensor that a Transpose to [batch, dim, L] was made from: the kernel reads either layout in
// place, and channels-contiguous rows fastest); z_offset (optional): z is sequence-major and wider, [batch, L, C], and
// the gate reads its channels [z_offset, z_offset + dim) in place (the exporter passes the tensor a Split along the
// channels was made from, so onnxruntime does not copy the slice). Outputs: y sequence-major, [batch, L, dim], and the
// last state [batch, dim, N], float32. The kernel writes straight into its outputs.
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

using Input = vmq_fx::ort::Input<float>;
constexpr auto input = vmq_fx::ort::input<float>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.SelectiveScan: " + what);
}

// [batch, C, L] strides of a [batch, C, L] tensor, or of a sequence-major [batch, L, C] one.
struct Layout {
  int64_t sb, sc, st;
};
Layout layout(int64_t channels, int64_t length, bool sequence_major) {
  return sequence_major ? Layout{length * channels, 1, channels} : Layout{channels * length, length, 1};
}

struct SelectiveScanKernel {
  SelectiveScanKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    softplus_ = kernel_info.GetAttribute<int64_t>("softplus") != 0;
    reverse_ = kernel_info.GetAttribute<int64_t>("reverse") != 0;
    try {
      for (int64_t index : kernel_info.GetAttributes<int64_t>("sequence_major")) {
        require(index == 0 || index == 1 || index == 3 || index == 4 || index == 6,
                "sequence_major names inputs among u (0), delta (1), B (3), C (4) and z (6)");
        sequence_major_[index] = true;
      }
    } catch (const Ort::Exception&) {  // absent: every input is [batch, channels, L]
    }
    try {
      z_offset_ = kernel_info.GetAttribute<int64_t>("z_offset");
      z_windowed_ = true;
    } catch (const Ort::Exception&) {  // absent: z has u's shape
    }
    require(!z_windowed_ || (z_offset_ >= 0 && sequence_major_[6]), "z_offset needs a sequence-major z, offset >= 0");
  }

  // An input's shape as [batch, channels, L] (or [batch, groups, N, L]) whatever its layout.
  std::vector<int64_t> logical(const Input& in, size_t index) const {
    if (!sequence_major_[index] || in.shape.size() != 3) return in.shape;
    return {in.shape[0], in.shape[2], in.shape[1]};
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Input u = input(ctx, 0), delta = input(ctx, 1), A = input(ctx, 2), B = input(ctx, 3), C = input(ctx, 4);
    const Input D = input(ctx, 5), z = input(ctx, 6), bias = input(ctx, 7);
    const std::vector<int64_t> u_shape = logical(u, 0), b_shape = logical(B, 3);
    require(u_shape.size() == 3 && logical(delta, 1) == u_shape, "u and delta must be [batch, dim, L] alike");
    const int64_t batch = u_shape[0], dim = u_shape[1], length = u_shape[2];
    require(A.shape.size() == 2 && A.shape[0] == dim, "A must be [dim, N]");
    const int64_t n_state = A.shape[1];
    require(B.shape.size() == C.shape.size() && (B.shape.size() == 3 || B.shape.size() == 4),
            "B and C must both be [batch, N, L] or [batch, groups, N, L]");
    const bool grouped = B.shape.size() == 4;
    require(!grouped || !(sequence_major_[3] || sequence_major_[4]), "grouped B and C come [batch, groups, N, L]");
    const int64_t groups = grouped ? B.shape[1] : 1;
    require(logical(C, 4) == b_shape && b_shape[0] == batch && b_shape[grouped ? 2 : 1] == n_state &&
                b_shape.back() == length && dim % groups == 0,
            "B and C must be [batch, (groups,) N, L] with groups dividing dim");
    if (z_windowed_)
      require(!z.data || (z.shape.size() == 3 && z.shape[0] == batch && z.shape[1] == length &&
                          z_offset_ + dim <= z.shape[2]),
              "z must be [batch, L, C] holding channels [z_offset, z_offset + dim)");
    else
      require(!z.data || logical(z, 6) == u_shape, "z must have u's shape");
    require((!D.data || D.shape == std::vector<int64_t>{dim}) && (!bias.data || bias.shape == std::vector<int64_t>{dim}),
            "D and delta_bias must be [dim]");

    const Shapes s = Shapes::of<float>(batch, dim, length, n_state, groups);
    // A sequence-major input's rows are as wide as its last axis: dim, or more for a windowed z (channels from offset).
    auto rows = [&](const Input& in, size_t index, int64_t offset = 0) {
      if (!in.data) return Strided3<float>();
      const Layout l = layout(sequence_major_[index] ? in.shape[2] : dim, length, sequence_major_[index]);
      return Strided3<float>(in.data + offset, l.sb, l.sc, l.st, length, reverse_);
    };
    // B / C [batch, (G,) N, L] (a 3-D one is shared by the single group, whose stride is then never used), or a 3-D
    // one sequence-major.
    auto states = [&](const Input& in, size_t index) {
      const Layout l = layout(n_state, length, sequence_major_[index]);
      return StridedBC<float>{in.data, grouped ? groups * n_state * length : l.sb, n_state * length, l.sc, l.st};
    };
    float* out_rows = ctx.GetOutput(0, {batch, length, dim}).GetTensorMutableData<float>();
    float* last = ctx.GetOutput(1, {batch, dim, n_state}).GetTensorMutableData<float>();
    // no add: the exporter writes the sum of Vim's two directions as an Add after the node, which ran as fast as an
    // add in this node's output pass (selective_scan's ONNX translation says why)
    const ScanForward<float> fwd{s,         rows(u, 0),    rows(delta, 1), rows(z, 6, z_offset_), Strided3<float>(),
                                 states(B, 3), states(C, 4), A.data,         D.data,                bias.data,
                                 softplus_,    reverse_,     out_rows,       last};
    vmq_fx::ort::parallel_chunks(ctx, fwd.tasks(), [&fwd](int64_t begin, int64_t end) { fwd.run(begin, end); });
  }

  bool softplus_ = false;
  bool reverse_ = false;
  bool sequence_major_[8] = {};
  int64_t z_offset_ = 0;
  bool z_windowed_ = false;  // the z_offset attribute is given
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
