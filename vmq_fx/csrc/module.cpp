// The vmq_fx CPU extension: one Python module, one registration function per kernel family.
#include <torch/extension.h>

void register_selective_scan(pybind11::module& m);
void register_quant_linear(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_selective_scan(m);
  register_quant_linear(m);
}
