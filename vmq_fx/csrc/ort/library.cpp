// vmq_fx's onnxruntime custom-op library: the entry point onnxruntime's SessionOptions.register_custom_ops_library
// calls. It links no torch: onnxruntime's headers and vmq_fx/csrc are all it needs, and its ops run on onnxruntime's
// intra-op threads.
//
// Standalone build (a deployment box without Python), with onnxruntime's include/onnxruntime headers:
//   g++ -O3 -std=c++17 -shared -fPIC -mavx2 -mfma -mf16c -I ORT_INCLUDE -I vmq_fx/csrc \
//       vmq_fx/csrc/ort/library.cpp vmq_fx/csrc/ort/selective_scan_op.cpp vmq_fx/csrc/ort/int8_linear_op.cpp \
//       vmq_fx/csrc/ort/causal_conv1d_op.cpp vmq_fx/csrc/ort/hadamard_op.cpp vmq_fx/csrc/ort/rms_norm_op.cpp \
//       -o libvmq_fx_ort.so
// (-mavx512f -mavx512bw -mavx512vl -mavx512dq for AVX-512 CPUs, no -m flags for any x86-64 or ARM64 CPU.)
#include <exception>
#include <mutex>

#include "ops.h"

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // One domain object for the process: onnxruntime keeps a pointer to it in every session that registers it.
  static Ort::CustomOpDomain* domain = nullptr;
  static std::mutex mutex;
  Ort::Status status{nullptr};
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (domain == nullptr) {
      domain = new Ort::CustomOpDomain("vmq");
      for (const OrtCustomOp* op : {vmq_fx::ort::selective_scan_op(), vmq_fx::ort::int8_linear_op(),
                                    vmq_fx::ort::causal_conv1d_op(), vmq_fx::ort::hadamard_transform_op(),
                                    vmq_fx::ort::rms_norm_op(), vmq_fx::ort::add_rms_norm_op()})
        domain->Add(op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    status = Ort::Status(e.what(), ORT_FAIL);
  }
  return status.release();
}
