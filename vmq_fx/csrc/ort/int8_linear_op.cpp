// onnxruntime custom op vmq.Int8Linear: vmq::int8_linear as one node. On CPUs with AVX-512 VNNI (the AVX-512 build)
// every exact product takes the torch op's uint8 x int8 product (linear_core.h's vnni_rows: quantize, vpdpbusd and
// rescale in one pass; Intel Xeon without AMX, one thread: vim_tiny's W8A8 file 1.26-1.35x / 1.21-1.40x its FP32 file
// at batch 1 / 8 in three runs, against 1.07-1.30x / 1.22-1.23x through MatMulInteger in the same processes, and in
// onnxruntime's profiler each of vim-fm-tiny's Int8Linear nodes at batch 64 as fast or up to 1.3x faster), and on CPUs
// with AMX-INT8 the same product on AMX tiles where it is the faster (amx_rows, amx_product: Intel Xeon with AMX, one
// thread, vim_tiny's W8A8 file 1.52x / 1.51x its FP32 file at batch 1 / 8, against 1.31x / 1.35x on vnni_rows and
// 1.36x / 1.30x through MatMulInteger, bench/int8_gemm_paths.py).
// Elsewhere one pass quantizes the activation per token (static or per-token dynamic parameters) with the torch op's
// arithmetic (linear_core.h), onnxruntime's own MatMulInteger multiplies (invoked from the kernel: MLAS, on the
// session's threads), and one pass rescales the int32 accumulators in place into the float output. In the AVX-512
// build, tiny K (dt_proj's 12) takes the torch op's direct product instead (linear_core.h: quantize, exact float FMAs
// and rescale in one pass, no MatMulInteger call); small products stay on MLAS, which multiplies them faster than the
// direct product's float FMAs, except where MLAS runs its uint8 x uint8 form (below): there small products
// (linear_core.h's small_product) take the torch op's int16 product (madd_rows: quantize, vpmaddwd and rescale in one
// pass), whose call costs less. vim-fm-tiny's W8A8 file at batch 1 (17 tokens), one thread, AMD EPYC Zen 3 (AVX2 only),
// four processes: 1.21-1.41 ms with the int16 product against 1.33-1.65 ms through MatMulInteger (the FP32 file:
// 1.14-1.70 ms, no slower). At Vim-T sizes MLAS's uint8 x uint8 is the faster (vim_tiny at batch 8: 1.11x the FP32
// file, 0.93x with every product on madd_rows).
//
// The operand types of the integer product are chosen here, for the CPU the library runs on, which a standard
// MatMulInteger node in the file cannot do: uint8 x int8 is onnxruntime's fast form (3.9x its fp32 MatMul at Vim-T
// shapes with VNNI), but without VNNI its 16-bit pair sums (vpmaddubsw) saturate once 2 x 255 x |w| passes 32767,
// i.e. for 8-bit weights. Those then go uint8 x uint8 (moved up by 128 once per weight, b_zero_point 128), exact on
// every CPU; weights of up to 7 bits always go uint8 x int8. VMQ_FX_ORT_UINT8_WEIGHTS=1 takes uint8 x uint8 for 8-bit
// weights on every CPU (what CPUs without VNNI run: for tests and benchmarks on VNNI machines); VMQ_FX_ORT_DIRECT=0
// takes MatMulInteger for every product (the vnni, direct and int16 products off, for tests and A/B benchmarks);
// VMQ_FX_ORT_AMX=0 keeps the AMX tiles off (vpdpbusd instead: what a CPU with VNNI and no AMX runs, for benchmarks on
// AMX machines). All are read when a session creates the kernel.
//
// Inputs: x [..., L, K] float; smooth [K]?; act_scale [L]? and act_zero_point [L] int32? (both absent: per-token
// dynamic, each row's parameters as torchao's choose_qparams_affine computes them); w_t [K, N] int8 (the weight,
// transposed and unpacked by the graph, folded at load); w_scale [N]; w_sum [N] int32 (column sums of the weight);
// bias [N]?. Attributes: qmin, qmax (unsigned activation levels), w_bits. Output: [..., L, N] float.
#include "ops.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "../linear_core.h"

namespace {

using vmq_fx::ort::Input;
using vmq_fx::ort::input;
using vmq_fx::ort::parallel_chunks;
using vmq_fx::ort::resolved_input;

// Whether environment variable `name` is set to `value` (the switches below, read when a session creates a kernel).
bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set && std::string(set) == value;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("vmq.Int8Linear: " + what);
}

// Whether MLAS multiplies uint8 x int8 with VNNI dot products (exact) rather than saturating 16-bit pair sums.
bool exact_u8s8() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni");
#else
  return false;  // ARM64 and others: take the form that is exact everywhere
#endif
}

// row(m) for m in [0, M), on onnxruntime's threads in tasks of 16 rows.
template <typename Row>
void for_rows(Ort::KernelContext& ctx, int64_t M, Row&& row) {
  constexpr int64_t kRowsPerTask = 16;
  parallel_chunks(ctx, (M + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin * kRowsPerTask; m < std::min(end * kRowsPerTask, M); ++m) row(m);
  });
}

struct Int8LinearKernel {
  Int8LinearKernel(const OrtApi&, const OrtKernelInfo* info)
      : memory_(Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault)) {
    Ort::ConstKernelInfo kernel_info(info);
    smooth_ = vmq_fx::ort::constant_input<float>(kernel_info, 1);
    scale_ = vmq_fx::ort::constant_input<float>(kernel_info, 2);
    zero_point_ = vmq_fx::ort::constant_input<int32_t>(kernel_info, 3);
    w_ = vmq_fx::ort::constant_input<int8_t>(kernel_info, 4);
    w_scale_ = vmq_fx::ort::constant_input<float>(kernel_info, 5);
    w_sum_ = vmq_fx::ort::constant_input<int32_t>(kernel_info, 6);
    bias_ = vmq_fx::ort::constant_input<float>(kernel_info, 7);
    qmin_ = kernel_info.GetAttribute<int64_t>("qmin");
    qmax_ = kernel_info.GetAttribute<int64_t>("qmax");
    const int64_t w_bits = kernel_info.GetAttribute<int64_t>("w_bits");
    require(0 <= qmin_ && qmin_ < qmax_ && qmax_ <= 255,
            "qmin / qmax must be unsigned 8-bit levels, got " + std::to_string(qmin_) + " / " + std::to_string(qmax_));
    require(2 <= w_bits && w_bits <= 8, "w_bits must be 2-8, got " + std::to_string(w_bits));
    signed_weight_ = w_bits <= 7 || (exact_u8s8() && !env_is("VMQ_FX_ORT_UINT8_WEIGHTS", "1"));
    use_direct_ = !env_is("VMQ_FX_ORT_DIRECT", "0");
    use_amx_ = !env_is("VMQ_FX_ORT_AMX", "0");
    const char* names[] = {"T1", "T2", "T3"};
    const ONNXTensorElementDataType types[] = {
        ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
        signed_weight_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
    // A and B alone for uint8 x int8; with the zero points 0 and 128 for uint8 x uint8.
    matmul_ = Ort::Op::Create(info, "MatMulInteger", "", 10, names, types, 3, nullptr, 0, signed_weight_ ? 2 : 4, 1);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto x = input<float>(ctx, 0);
    Input<float> smooth_in, scale_in, w_scale_in, bias_in;
    Input<int32_t> zero_point_in, w_sum_in;
    Input<int8_t> w_in;
    const auto& smooth = resolved_input(ctx, 1, smooth_, smooth_in);
    const auto& scale = resolved_input(ctx, 2, scale_, scale_in);
    const auto& zero_point = resolved_input(ctx, 3, zero_point_, zero_point_in);
    const auto& w = resolved_input(ctx, 4, w_, w_in);
    const auto& w_scale = resolved_input(ctx, 5, w_scale_, w_scale_in);
    const auto& w_sum = resolved_input(ctx, 6, w_sum_, w_sum_in);
    const auto& bias = resolved_input(ctx, 7, bias_, bias_in);
    require(x.shape.size() >= 2, "x must be [..., L, K]");
    const int64_t K = x.shape.back(), L = x.shape[x.shape.size() - 2], M = x.numel() / (K ? K : 1);
    require(w.shape.size() == 2 && w.shape[0] == K, "the weight must be [K, N] with x's K");
    const int64_t N = w.shape[1];
    require(!smooth.data || smooth.numel() == K, "smooth must be [K]");
    const bool dynamic = !scale.data;
    require(dynamic == !zero_point.data,
            "act_scale and act_zero_point are both given (static) or both absent (per-token dynamic)");
    require(dynamic || (scale.numel() == L && zero_point.numel() == L), "act_scale / act_zero_point must be [L]");
    require(w_sum.numel() == N && w_scale.numel() == N && (!bias.data || bias.numel() == N),
            "w_sum, w_scale and bias must be [N]");

    std::vector<int64_t> out_shape = x.shape;
    out_shape.back() = N;
    float* out = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
    // Without VNNI: tiny K only where measured faster than MatMulInteger (the AVX-512 build); MLAS keeps the small
    // products unless it multiplies uint8 x uint8 (the int16 product).
#if VMQ_HAS_VNNI
    const bool vnni = use_direct_ && vmq_fx::linear::vnni_exact(K, qmin_, qmax_, 128, zero_point.data, L);
#else
    const bool vnni = false;
#endif
    const bool direct = !vnni && use_direct_ &&
                        vmq_fx::linear::direct_product(M, N, K, qmin_, qmax_, 128, zero_point.data, L,
                                                       /*small_products=*/false,
                                                       /*tiny_k=*/vmq_fx::linear::kDirectTinyKFaster);

    // The levels, and per row its scale and zero point (dynamic) or its token's (static, period L).
    thread_local std::vector<uint8_t> levels;
    thread_local std::vector<float> row_scale;
    thread_local std::vector<int32_t> row_zero_point;
    const float* scales = scale.data;
    const int32_t* zero_points = zero_point.data;
    int64_t period = L;
    if (dynamic) {
      row_scale.resize(static_cast<size_t>(M));
      row_zero_point.resize(static_cast<size_t>(M));
      scales = row_scale.data();
      zero_points = row_zero_point.data();
      period = M;
    }
    const float lo = static_cast<float>(qmin_), hi = static_cast<float>(qmax_);
    // Pointers, not the thread_local vectors, go into the lambdas: those run on onnxruntime's other threads.
    float* dynamic_scale = row_scale.data();
    int32_t* dynamic_zero_point = row_zero_point.data();
#if VMQ_HAS_MADD
    const bool int16 = !vnni && !direct && use_direct_ && !signed_weight_ && vmq_fx::linear::small_product(M, N, K) &&
                       vmq_fx::linear::madd_exact(K, qmin_, qmax_, 128, zero_point.data, L);
#else
    const bool int16 = false;
#endif
    if (vnni || direct || int16) {  // linear_core.h's own products: quantize, multiply and rescale in one pass
      if (dynamic)
        for_rows(ctx, M, [&](int64_t m) {
          vmq_fx::linear::token_qparams(x.data + m * K, smooth.data, K, qmin_, qmax_, dynamic_scale + m,
                                        dynamic_zero_point + m);
        });
      const auto own_product = [&](int64_t rows, const auto& product) {
        parallel_chunks(ctx, (M + rows - 1) / rows,
                        [&](int64_t begin, int64_t end) { product(begin * rows, std::min(end * rows, M)); });
      };
      if (vnni) {
#if VMQ_HAS_AMX
        if (use_amx_ && vmq_fx::linear::amx_product(M, K)) {
          const int8_t* wt = amx_weight(w, K, N);
          own_product(vmq_fx::linear::kAmxRows, [&](int64_t m0, int64_t m1) {
            vmq_fx::linear::amx_rows(x.data, smooth.data, scales, zero_points, period, lo, hi, K, wt, w_sum.data,
                                     w_scale.data, bias.data, N, m0, m1, out);
          });
          return;
        }
#endif
#if VMQ_HAS_VNNI
        const int8_t* wt = vnni_weight(w, K, N);
        own_product(vmq_fx::linear::kVnniRows, [&](int64_t m0, int64_t m1) {
          vmq_fx::linear::vnni_rows(x.data, smooth.data, scales, zero_points, period, lo, hi, K, wt, w_sum.data,
                                    w_scale.data, bias.data, N, m0, m1, out);
        });
#endif
      } else if (direct) {
        const float* wt = direct_weight(w, K, N);
        own_product(vmq_fx::linear::kDirectRows, [&](int64_t m0, int64_t m1) {
          vmq_fx::linear::direct_rows(x.data, smooth.data, scales, zero_points, period, lo, hi, K, wt, w_scale.data,
                                      bias.data, N, m0, m1, out);
        });
      }
#if VMQ_HAS_MADD
      else {
        const int16_t* wt = madd_weight(w, K, N);
        own_product(vmq_fx::linear::kMaddRows, [&](int64_t m0, int64_t m1) {
          vmq_fx::linear::madd_rows(x.data, smooth.data, scales, zero_points, period, lo, hi, K, wt, w_scale.data,
                                    bias.data, N, m0, m1, out);
        });
      }
#endif
      return;
    }
    levels.resize(static_cast<size_t>(M * K));
    uint8_t* q = levels.data();
    for_rows(ctx, M, [&](int64_t m) {
      const float* row = x.data + m * K;
      if (dynamic)
        vmq_fx::linear::token_qparams(row, smooth.data, K, qmin_, qmax_, dynamic_scale + m, dynamic_zero_point + m);
      const int64_t t = m % period;
      // as quantize_per_channel: x * (1 / scale)
      vmq_fx::linear::quantize_row(row, smooth.data, 1.0f / scales[t], static_cast<float>(zero_points[t]), lo, hi,
                                   0.0f, K, q + m * K);
    });

    // The int32 product goes into the output's memory and is rescaled in place.
    const int64_t a_shape[] = {M, K}, c_shape[] = {M, N}, scalar[] = {1};
    Ort::Value a = Ort::Value::CreateTensor<uint8_t>(memory_, q, static_cast<size_t>(M * K), a_shape, 2);
    Ort::Value c = Ort::Value::CreateTensor<int32_t>(memory_, reinterpret_cast<int32_t*>(out),
                                                     static_cast<size_t>(M * N), c_shape, 2);
    uint8_t a_zero = 0, b_zero = 128;
    Ort::Value a_zp = Ort::Value::CreateTensor<uint8_t>(memory_, &a_zero, 1, scalar, 0);
    Ort::Value b_zp = Ort::Value::CreateTensor<uint8_t>(memory_, &b_zero, 1, scalar, 0);
    if (signed_weight_) {
      const OrtValue* inputs[] = {a, w.value};
      OrtValue* outputs[] = {c};
      matmul_.Invoke(context, inputs, 2, outputs, 1);
    } else {
      Ort::Value b = shifted_weight(w, K, N);
      const OrtValue* inputs[] = {a, b, a_zp, b_zp};
      OrtValue* outputs[] = {c};
      matmul_.Invoke(context, inputs, 4, outputs, 1);
    }
    const int32_t* acc = reinterpret_cast<const int32_t*>(out);
    for_rows(ctx, M, [&](int64_t m) {
      const int64_t t = m % period;
      vmq_fx::linear::rescale_row(acc + m * N, zero_points[t], scales[t], w_sum.data, w_scale.data, bias.data, N,
                                  out + m * N);
    });
  }

  // The weight's levels as floats for the direct product.
  const float* direct_weight(const Input<int8_t>& w, int64_t K, int64_t N) {
    return direct_.get(w.data, K * vmq_fx::linear::direct_padded_cols(N), [&](float* out) {
      vmq_fx::linear::direct_weight([&](int64_t n, int64_t k) { return w.data[k * N + n]; }, N, K, out);
    });
  }

#if VMQ_HAS_VNNI
  // The weight's levels as int8 quads for the uint8 x int8 product.
  const int8_t* vnni_weight(const Input<int8_t>& w, int64_t K, int64_t N) {
    return vnni_.get(w.data, (K + 3) / 4 * vmq_fx::linear::vnni_padded_cols(N) * 4, [&](int8_t* out) {
      vmq_fx::linear::vnni_weight([&](int64_t n, int64_t k) { return w.data[k * N + n]; }, N, K, out);
    });
  }
#endif

#if VMQ_HAS_AMX
  // The weight's levels as AMX B tiles for the product on tiles.
  const int8_t* amx_weight(const Input<int8_t>& w, int64_t K, int64_t N) {
    return amx_.get(w.data, vmq_fx::linear::amx_weight_size(N, K), [&](int8_t* out) {
      vmq_fx::linear::amx_weight([&](int64_t n, int64_t k) { return w.data[k * N + n]; }, N, K, out);
    });
  }
#endif

#if VMQ_HAS_MADD
  // The weight's levels as int16 pairs for the int16 product.
  const int16_t* madd_weight(const Input<int8_t>& w, int64_t K, int64_t N) {
    return madd_.get(w.data, (K + 1) / 2 * vmq_fx::linear::madd_padded_cols(N) * 2, [&](int16_t* out) {
      vmq_fx::linear::madd_weight([&](int64_t n, int64_t k) { return w.data[k * N + n]; }, N, K, out);
    });
  }
#endif

  // The weight moved up by 128 into uint8.
  Ort::Value shifted_weight(const Input<int8_t>& w, int64_t K, int64_t N) {
    uint8_t* shifted = shifted_.get(w.data, K * N, [&](uint8_t* out) {
      for (int64_t i = 0; i < K * N; ++i) out[i] = static_cast<uint8_t>(w.data[i] + 128);
    });
    const int64_t shape[] = {K, N};
    return Ort::Value::CreateTensor<uint8_t>(memory_, shifted, static_cast<size_t>(K * N), shape, 2);
  }

  // A form of the weight made on the first call and kept: the weight is an initializer, the same memory and values in
  // every call (a new source pointer remakes it). It starts on a 64-byte boundary (AMX tile rows that straddle cache
  // lines load slower).
  template <typename T>
  struct DerivedWeight {
    std::mutex mutex;
    std::vector<T> data;
    T* aligned = nullptr;
    const int8_t* source = nullptr;

    template <typename Fill>
    T* get(const int8_t* w, int64_t size, Fill&& fill) {
      std::lock_guard<std::mutex> lock(mutex);
      if (source != w) {
        data.resize(static_cast<size_t>(size) + 64 / sizeof(T));
        aligned = vmq_fx::linear::cache_line_aligned(data.data());
        fill(aligned);
        source = w;
      }
      return aligned;
    }
  };

  Ort::MemoryInfo memory_;
  Ort::Op matmul_{nullptr};
  Input<float> smooth_, scale_, w_scale_, bias_;  // the constant inputs (constant_input)
  Input<int32_t> zero_point_, w_sum_;
  Input<int8_t> w_;
  int64_t qmin_ = 0, qmax_ = 255;
  bool signed_weight_ = true, use_direct_ = true, use_amx_ = true;
  DerivedWeight<uint8_t> shifted_;
  DerivedWeight<float> direct_;
  DerivedWeight<int16_t> madd_;
  DerivedWeight<int8_t> vnni_;
  DerivedWeight<int8_t> amx_;
};

struct Int8LinearOp : Ort::CustomOpBase<Int8LinearOp, Int8LinearKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Int8LinearKernel(api, info); }
  const char* GetName() const { return "Int8Linear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 3:
      case 6:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case 4:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 1 || index == 2 || index == 3 || index == 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* vmq_fx::ort::int8_linear_op() {
  static const Int8LinearOp op;
  return &op;
}
