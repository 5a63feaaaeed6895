// CPU kernels of vmq::rms_norm (x * (1 / sqrt(mean(x^2, -1) + eps)) * weight, one pass per row) and
// vmq::add_rms_norm (the same of x + residual, and that sum).
//
// The torch wrappers of rms_norm_core.h (at::parallel_for over rows). The backward is the Python autograd formula
// (vmq_fx/ops/rms_norm.py), so only the CPU key is registered here.

#include "kernels.h"
#include "rms_norm_core.h"

#include <ATen/Parallel.h>

namespace {

// run(begin, end) over the rows of x ([..., d]) in parallel.
template <typename Run>
void over_rows(const at::Tensor& x, Run&& run) {
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), run);
}

void check(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "vmq.", op, ": x must have at least one axis");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "vmq.", op,
                    ": x must be float32 or float64, got ", vmq_fx::dtype_name(x));
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), "vmq.", op, ": weight must be [", x.size(-1),
                    "] (the last axis of x), got shape ", weight.sizes());
}

}  // namespace

namespace vmq_fx {

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check("rms_norm", x_in, weight_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vmq.rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    over_rows(x, [&](int64_t begin, int64_t end) {
      norm::rms_norm_rows(xp, begin, end, x.size(-1), wp, static_cast<scalar_t>(eps), yp);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                    const at::Tensor& weight_in, double eps) {
  check("add_rms_norm", x_in, weight_in);
  TORCH_CHECK_VALUE(residual_in.sizes() == x_in.sizes() && residual_in.scalar_type() == x_in.scalar_type(),
                    "vmq.add_rms_norm: residual must have x's shape ", x_in.sizes(), " and dtype ", dtype_name(x_in),
                    ", got ", residual_in.sizes(), " ", dtype_name(residual_in));
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const at::Tensor weight = weight_in.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options()), sum = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vmq.add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    over_rows(x, [&](int64_t begin, int64_t end) {
      norm::add_rms_norm_rows(xp, rp, begin, end, x.size(-1), wp, static_cast<scalar_t>(eps), yp, sp);
    });
  });
  return {out, sum};
}

static void register_rms_norm(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("rms_norm", TORCH_FN(rms_norm_cpu));
  cpu.impl("add_rms_norm", TORCH_FN(add_rms_norm_cpu));
  for (const char* op : {"rms_norm", "add_rms_norm"})
    autograd_cpu.impl(op, torch::CppFunction::makeFromBoxedFunction<&backward_in_python>());
}
VMQ_FX_CPU_KERNELS(register_rms_norm);

}  // namespace vmq_fx
