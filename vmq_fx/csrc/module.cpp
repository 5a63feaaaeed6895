// The vmq_fx CPU extension. register_cpu_kernels() makes the C++ kernels the CPU implementations of the vmq ops in
// torch's dispatcher (over the pure-torch implementations the ops are defined with), so that a call from a graph
// module goes straight to C++; deregister_cpu_kernels() removes them again (tests, and the benchmarks' comparison
// with the pure-torch path).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <memory>

#include "graph_runner.h"
#include "kernels.h"
#include "vec.h"

namespace vmq_fx {

namespace {

bool grad_required(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  if (!at::GradMode::is_enabled()) return false;
  for (const c10::IValue& v : torch::jit::last(stack, op.schema().arguments().size()))
    if (v.isTensor() && v.toTensor().requires_grad()) return true;
  return false;
}

}  // namespace

// The quantized linears have no backward (their weights and scales are quantized constants). With grad mode on, an
// input that requires grad is refused here, with the text of the pure-torch implementation
// (vmq_fx/ops/_no_backward.py; tests/test_int8_linear.py checks both); otherwise the call goes on below autograd
// without the Python autograd layer's cost.
void no_backward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  TORCH_CHECK(!grad_required(op, *stack), "vmq.", op.schema().name().substr(5),
              ": no backward (the weights and scales are quantized constants); run the quantized model under "
              "torch.no_grad(), or differentiate the prepared (fake-quantized) model");
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// Ops with a backward keep it in Python (torch.library's register_autograd, which registers for the Autograd alias
// key). That layer runs on every call, also under torch.no_grad(): Vim-T's lowered W8A8 model at batch 1 took 52.7 ms
// with it on the scan, the convolution and the norms and 44.8 ms without (Intel Xeon, one thread), far more than its
// ~10 us a call in a loop of its own. So the call goes on below autograd here unless a gradient is needed; then it
// goes to the Python layer, which is the kernel of AutogradOther (the Autograd alias's kernel for every autograd key
// without its own; AutogradCPU's is this one).
void backward_in_python(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::DispatchKeySet below = keys & c10::after_autograd_keyset;
  op.redispatchBoxed(grad_required(op, *stack) ? below | c10::DispatchKeySet(c10::DispatchKey::AutogradOther) : below,
                     stack);
}

}  // namespace vmq_fx

namespace {

std::unique_ptr<torch::Library> cpu_impls, autograd_impls;

void register_cpu_kernels() {
  if (cpu_impls) return;
  cpu_impls = std::make_unique<torch::Library>(torch::Library::IMPL, "vmq", c10::DispatchKey::CPU, __FILE__, __LINE__);
  autograd_impls = std::make_unique<torch::Library>(torch::Library::IMPL, "vmq", c10::DispatchKey::AutogradCPU,
                                                    __FILE__, __LINE__);
  for (const auto registration : vmq_fx::registrations()) registration(*cpu_impls, *autograd_impls);
}

void deregister_cpu_kernels() {
  cpu_impls.reset();
  autograd_impls.reset();
}

bool cpu_kernels_registered() { return cpu_impls != nullptr; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_cpu_kernels", &register_cpu_kernels);
  m.def("deregister_cpu_kernels", &deregister_cpu_kernels);
  m.def("cpu_kernels_registered", &cpu_kernels_registered);
  m.def("quantize_per_token", &vmq_fx::quantize_per_token_cpu);  // the activation levels, for tests
  m.def("set_int8_gemm", &vmq_fx::set_int8_gemm);
  m.def("int8_gemm", &vmq_fx::int8_gemm);
  m.def("set_int8_direct", &vmq_fx::set_int8_direct);
  m.def("set_vq_decode_once", &vmq_fx::set_vq_decode_once);
  m.def("vq_decode_once", &vmq_fx::vq_decode_once);
  m.attr("isa") = VMQ_ISA_NAME;
  vmq_fx::bind_graph_runner(m);
}
