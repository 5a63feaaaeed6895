// CPU kernels of the vmq ops (signatures follow the op schemas defined in vmq_fx/ops).
#pragma once

// ATen and the dispatcher's registration API only. torch/extension.h (the C++ frontend and pybind11, which only
// module.cpp needs) made each kernel file 32-38 s to compile, now 12-18 s (one g++ at a time, Intel Xeon), and every
// CPU class's build compiles every file: the avx512 build went from about 130 to 66 s on two cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vec.h"

namespace vmq_fx {

// Each kernel file registers its own ops (VMQ_FX_CPU_KERNELS(fn): fn(cpu, autograd_cpu) adds the impls to the two
// libraries); module.cpp's register_cpu_kernels() applies every registration, so a new op's kernel touches its own
// file only.
// Hidden (vec.h): shared by every loaded build, registering one build would register the others' kernels too.
using Registration = void (*)(torch::Library& cpu, torch::Library& autograd_cpu);
VMQ_BUILD_LOCAL inline std::vector<Registration>& registrations() {
  static std::vector<Registration> all;
  return all;
}
struct AddRegistration {
  explicit AddRegistration(Registration r) { registrations().push_back(r); }
};
#define VMQ_FX_CPU_KERNELS(fn) static const ::vmq_fx::AddRegistration vmq_fx_registration_##fn(&fn)

// The AutogradCPU kernels (module.cpp) of ops without a backward (refuses inputs that require grad) and of ops whose
// backward is registered in Python (skips that layer where no gradient is needed). Every op has one of the two.
void no_backward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);
void backward_in_python(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

// A dtype as Python's str(torch.<dtype>) without "torch.", so that the kernels' refusals read as the pure-torch
// implementations' (tests/test_op_definitions.py compares them).
inline std::string dtype_name(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return c10::toString(t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                      const std::optional<at::Tensor>& D,
                                                      const std::optional<at::Tensor>& z,
                                                      const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                      bool reverse, const std::optional<at::Tensor>& add);

// Gradients of (u, delta, A, B, C, D, z, delta_bias) in the inputs' dtypes and layouts (undefined where absent).
std::vector<at::Tensor> selective_scan_backward_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                    const at::Tensor& B, const at::Tensor& C,
                                                    const std::optional<at::Tensor>& D,
                                                    const std::optional<at::Tensor>& z,
                                                    const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                    bool reverse, const at::Tensor& grad_out,
                                                    const at::Tensor& grad_last);

at::Tensor causal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool silu, bool reverse);

// x @ kron(odd, H) over the last axis (the fast Walsh-Hadamard transform; odd [m, m] or none).
at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& odd);

// x * (1 / sqrt(mean(x^2, -1) + eps)) * weight, one pass per row; add_rms_norm: that of x + residual, and the sum.
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps);

at::Tensor int8_linear_cpu(const at::Tensor& x, const std::optional<at::Tensor>& smooth,
                           const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& act_zero_point,
                           const at::Tensor& w, const at::Tensor& w_scale,
                           const at::Tensor& w_sum, const std::optional<at::Tensor>& bias, int64_t act_qmin,
                           int64_t act_qmax, int64_t w_bits);

at::Tensor vq_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebook, const at::Tensor& row_scale,
                             int64_t in_features);

at::Tensor vq_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                         const at::Tensor& row_scale, const std::optional<at::Tensor>& bias, int64_t in_features);

// How int8_linear multiplies: "int_mm" (at::_int_mm) or "float" (fp32 GEMM on the levels); see int8_linear.cpp.
void set_int8_gemm(const std::string& path);
std::string int8_gemm();
// Whether vmq::int8_linear takes its direct product where it applies (on by default; off for A/B benchmarks and for
// tests that compare it with the libraries' products on the same shapes).
void set_int8_direct(bool enabled);

// Whether vq_linear decodes each weight once and keeps the float32 weight (the default) or decodes it per call.
void set_vq_decode_once(bool once);
bool vq_decode_once();

// The activation levels of int8_linear (levels - shift, as int8), for tests.
at::Tensor quantize_per_token_cpu(const at::Tensor& x2, const std::optional<at::Tensor>& smooth,
                                  const at::Tensor& act_scale, const at::Tensor& zero_point, int64_t qmin,
                                  int64_t qmax, int64_t shift);

// Calibration statistics (vmq_fx/observers): per-token min / max and channel max |x| of [batch, L, C]; per-token
// histogram counting; the Lp range search over histograms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats(const at::Tensor& x);
void histogram_add(const at::Tensor& x, at::Tensor& counts, at::Tensor& start, at::Tensor& width, const at::Tensor& lo,
                   const at::Tensor& hi);
std::tuple<at::Tensor, at::Tensor> histogram_search(const at::Tensor& counts, const at::Tensor& start,
                                                    const at::Tensor& width, const at::Tensor& lo,
                                                    const at::Tensor& hi, int64_t levels, double p,
                                                    int64_t num_candidates);

}  // namespace vmq_fx
