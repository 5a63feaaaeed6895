// CPU kernel of vmq::rms_norm: x * (1 / sqrt(mean(x^2, -1) + eps)) * weight, one pass per row.
//
// The torch wrapper of rms_norm_core.h (at::parallel_for over rows). The backward is the Python autograd formula
// (vmq_fx/ops/rms_norm.py), so only the CPU key is registered here.

#include "kernels.h"
#include "rms_norm_core.h"

#include <ATen/Parallel.h>

namespace {

template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* yp = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    vmq_fx::norm::rms_norm_rows(xp, begin, end, d, wp, static_cast<T>(eps), yp);
  });
}

}  // namespace

namespace vmq_fx {

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "vmq.rms_norm: x must have at least one axis");
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                    "vmq.rms_norm: x must be float32 or float64, got ", dtype_name(x_in));
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && weight_in.size(0) == x_in.size(-1), "vmq.rms_norm: weight must be [",
                    x_in.size(-1), "] (the last axis of x), got shape ", weight_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kDouble)
    norm_rows<double>(x, weight, eps, out);
  else
    norm_rows<float>(x, weight, eps, out);
  return out;
}

static void register_rms_norm(torch::Library& cpu, torch::Library&) {
  cpu.impl("rms_norm", TORCH_FN(rms_norm_cpu));
}
VMQ_FX_CPU_KERNELS(register_rms_norm);

}  // namespace vmq_fx
