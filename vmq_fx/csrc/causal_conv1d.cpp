// CPU kernel of vmq::causal_conv1d: depthwise (anti-)causal convolution + optional SiLU on [batch, L, channels].
//
// The torch wrapper of causal_conv1d_core.h (at::parallel_for over batch x runs of rows).

#include "causal_conv1d_core.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <vector>

namespace {

using namespace vmq_fx;

template <typename T>
void conv_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool silu, bool reverse,
               at::Tensor& out) {
  const int64_t batch = x.size(0), length = x.size(1), channels = x.size(2), kernel = weight.size(1);
  // The taps as [K, channels], transposed here: as tensor ops (t, contiguous) four dispatcher calls and an allocation
  // a call, 2 % of the lowered Vim-T at batch 1 in the profiler.
  thread_local std::vector<T> taps;
  taps.resize(kernel * channels);
  const T* w = weight.data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t j = 0; j < kernel; ++j) taps[j * channels + c] = w[c * weight.stride(0) + j * weight.stride(1)];
  const T* xp = x.data_ptr<T>();
  const T* wp = taps.data();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, conv::conv_tasks(batch, length), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      conv::conv_task(task, xp, x.stride(0), x.stride(1), length, channels, wp, kernel, bp, silu, reverse, op);
  });
}

}  // namespace

namespace vmq_fx {

at::Tensor causal_conv1d_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool silu, bool reverse) {
  TORCH_CHECK_VALUE(x_in.dim() == 3, "vmq.causal_conv1d: x must be [batch, L, channels], got shape ", x_in.sizes());
  const int64_t channels = x_in.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == channels, "vmq.causal_conv1d: weight must be [channels=",
                    channels, ", K], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == channels),
                    "vmq.causal_conv1d: bias must be [channels=", channels, "], got shape ",
                    bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(weight.size(1) >= 1 && weight.size(1) <= conv::kMaxWidth,
                    "vmq.causal_conv1d: the CPU kernel handles widths 1 to 8 (Mamba uses 4), got ", weight.size(1));
  const auto cdt = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = x_in.to(cdt);
  if (x.stride(2) != 1) x = x.contiguous();
  const at::Tensor w = weight.to(cdt);
  const at::Tensor b = bias ? bias->to(cdt).contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (cdt == at::kDouble)
    conv_rows<double>(x, w, b, silu, reverse, out);
  else
    conv_rows<float>(x, w, b, silu, reverse, out);
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

static void register_causal_conv1d(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("causal_conv1d", TORCH_FN(causal_conv1d_cpu));
  autograd_cpu.impl("causal_conv1d", torch::CppFunction::makeFromBoxedFunction<&backward_in_python>());
}
VMQ_FX_CPU_KERNELS(register_causal_conv1d);

}  // namespace vmq_fx
