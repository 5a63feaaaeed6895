// CPU kernel of vmq::hadamard_transform: x @ kron(odd, H) over the last axis by the fast Walsh-Hadamard transform.
//
// The torch wrapper of hadamard_core.h (at::parallel_for over rows). The backward is the op itself (Python autograd,
// vmq_fx/ops/hadamard.py), so only the CPU key is registered here.

#include "hadamard_core.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename T>
void hadamard_rows(const at::Tensor& x, const at::Tensor& odd, int64_t m, at::Tensor& out) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const T* xp = x.data_ptr<T>();
  const T* op = odd.defined() ? odd.data_ptr<T>() : nullptr;
  T* yp = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<T> work(m > 1 ? d : 0);
    vmq_fx::hadamard::transform_rows(xp, begin, end, d, op, m, yp, work.data());
  });
}

}  // namespace

namespace vmq_fx {

at::Tensor hadamard_transform_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& odd_in) {
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "vmq.hadamard_transform: x must have at least one axis");
  TORCH_CHECK_VALUE(at::isFloatingType(x_in.scalar_type()), "vmq.hadamard_transform: x must be floating point, got ",
                    dtype_name(x_in));
  TORCH_CHECK_VALUE(!odd_in || (odd_in->dim() == 2 && odd_in->size(0) == odd_in->size(1) && odd_in->size(0) >= 1),
                    "vmq.hadamard_transform: odd must be a square [m, m] matrix, got shape ",
                    odd_in ? odd_in->sizes() : at::IntArrayRef{});
  const int64_t d = x_in.size(-1), m = odd_in ? odd_in->size(0) : 1;
  TORCH_CHECK_VALUE(d % m == 0 && hadamard::power_of_two(d / m), "vmq.hadamard_transform: the last axis (", d,
                    ") must be ", m, " x a power of two (odd is [", m, ", ", m, "])");
  const auto cdt = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.to(cdt).contiguous();
  const at::Tensor odd = odd_in ? odd_in->to(cdt).contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) {
    if (cdt == at::kDouble)
      hadamard_rows<double>(x, odd, m, out);
    else
      hadamard_rows<float>(x, odd, m, out);
  }
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

static void register_hadamard_transform(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("hadamard_transform", TORCH_FN(hadamard_transform_cpu));
  autograd_cpu.impl("hadamard_transform", torch::CppFunction::makeFromBoxedFunction<&backward_in_python>());
}
VMQ_FX_CPU_KERNELS(register_hadamard_transform);

}  // namespace vmq_fx
