// CPU path of vmq::int8_linear (vmq_fx/ops/int8_linear.py defines the op).
//
// One pass quantizes the activation per token (x / smooth * (1 / scale), round half to even, + zero
// point, clamp, - shift into int8), the integer product goes into the output's memory, and one pass rescales in place:
// (acc - (zp - shift) * colsum(W)) * act_scale[t] * w_scale[n] + bias[n]. The column sums come from the lowering (they
// depend on the weight only). The levels and the float operations are those of the pure-torch path, in the same order.
//
// Small products, few rows and tiny K (linear_core.h's direct_product) are multiplied in the kernel itself, quantized
// and rescaled in the same pass: a library call costs more than their arithmetic (~10-25 us), and the separate
// quantize and rescale passes more than a 12-deep product (dt_proj). On CPUs with AVX-512 VNNI (AVX-512 builds) the
// uint8 x int8 product (vnni_rows, vpdpbusd) takes them; elsewhere with K > 32 x86 builds take the int16 product
// (madd_rows), 1.2-1.7x faster than the float FMAs that tiny K and ARM64 builds multiply the levels with. Every other
// product has five paths, chosen once per process (set_int8_gemm, from vmq_fx/ops/native.py):
//   amx:    for CPUs with AMX-INT8 (Sapphire Rapids and later; Linux grants the tiles): every product the uint8 x int8
//           product takes exactly on AMX tiles (linear_core.h's amx_rows: quantize, tdpbusd and rescale in one pass),
//           but for few rows and tiny K (amx_product), which take vnni_rows; the others on at::_int_mm. Vim-T's in_proj
//           at batch 8 0.51 ms against 1.14 on vnni_rows (Intel Xeon with AMX, one thread). It replaced oneDNN's matmul
//           primitive (torch's onednn::qlinear_pointwise, which uses AMX where at::_int_mm does not, with quantize and
//           rescale passes around it): vim_tiny W8A8 1.56x / 1.70x FP32 at batch 1 / 8 against 1.37x / 1.59x, one
//           process (bench/int8_gemm_paths.py).
//   vnni:   for CPUs with AVX-512 VNNI and no AMX: every product the uint8 x int8 product takes exactly (vnni_exact) on
//           it, quantized and rescaled in the same pass: as fast as at::_int_mm with its quantize and rescale passes
//           on Vim-T's large products, 1.2-1.3x on the small ones (x_proj, dt_proj, batch 1; Intel Xeon, one thread,
//           linear_core.h). The others on at::_int_mm.
//   int_mm: at::_int_mm (oneDNN's gemm API) with int32 accumulation, exact: fast only where the CPU has int8
//           dot-product instructions (VNNI; it does not use AMX tiles); without them it is many times slower than the
//           fp32 GEMM (and wrong under a oneDNN capped below VNNI, whose 16-bit pair sums saturate).
//   int16:  for x86 CPUs without int8 dot products: linear_core.h's int16 product (vpmaddwd), exact, quantized and
//           rescaled in the same pass (the weight's int16 levels cached). Tiny K (dt_proj's 12) goes to the float path.
//   float:  the same activation levels dequantized ((level - zp) * act_scale, as dequantize_per_channel) times the
//           dequantized weight (w_int * w_scale, made once per weight tensor and cached while it lives) in the fp32
//           GEMM, with the bias: what the Q/DQ reference graph computes, the fp32 model's work plus one pass over x.
//           It differs from the exact integer path by float rounding (~1e-7 relative). ARM64 builds take it.
//

#include "kernels.h"
#include "linear_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using namespace vmq_fx::linear;

// x2 [M, K] as contiguous float32 rows. Float rows a stride apart (dt_proj's input, a slice of x_proj's output) are
// copied into a per-thread buffer, valid until the thread's next call: contiguous() made that four dispatcher calls
// and an allocation, ~2 % of the lowered Vim-T at batch 1 in the profiler.
at::Tensor float_rows(const at::Tensor& x2) {
  const int64_t M = x2.size(0), K = x2.size(1);
  if (x2.scalar_type() != at::kFloat || x2.is_contiguous() || x2.stride(1) != 1 || M == 0) return f32(x2);
  thread_local std::vector<float> rows;
  rows.resize(M * K);
  const float* p = x2.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) std::memcpy(rows.data() + m * K, p + m * x2.stride(0), K * sizeof(float));
  return at::from_blob(rows.data(), {M, K}, x2.options());
}

// Per-token dynamic parameters of each row of x2 (/ smooth), as torchao's choose_qparams_affine computes them in
// float32 (asymmetric, the range widened to hold 0, scale at least float32 epsilon): scale float [M], zero point int
// [M]. The quantize and rescale passes then index them by row (their period is M instead of L).
std::pair<at::Tensor, at::Tensor> dynamic_token_qparams(const at::Tensor& x2, const c10::optional<at::Tensor>& smooth,
                                                        int64_t qmin, int64_t qmax) {
  const int64_t M = x2.size(0), K = x2.size(1);
  auto scale = at::empty({M}, x2.options());
  auto zero_point = at::empty({M}, x2.options().dtype(at::kInt));
  const float* xp = x2.data_ptr<float>();
  const float* sp = smooth ? smooth->data_ptr<float>() : nullptr;
  float* scp = scale.data_ptr<float>();
  int32_t* zpp = zero_point.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) token_qparams(xp + m * K, sp, K, qmin, qmax, scp + m, zpp + m);
  });
  return {scale, zero_point};
}

at::Tensor quantize_per_token(const at::Tensor& x2, const c10::optional<at::Tensor>& smooth,
                              const at::Tensor& act_scale, const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                              int64_t shift) {
  const int64_t M = x2.size(0), K = x2.size(1), L = act_scale.size(0);
  auto out = scratch(0, {M, K}, at::kChar);
  const float* xp = x2.data_ptr<float>();
  const float* sp = smooth ? smooth->data_ptr<float>() : nullptr;
  const float* scale = act_scale.data_ptr<float>();
  const int32_t* zp = zero_point.data_ptr<int32_t>();
  int8_t* op = out.data_ptr<int8_t>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), sh = static_cast<float>(shift);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t t = m % L;
      // as quantize_per_channel: x * (1 / scale)
      quantize_row(xp + m * K, sp, 1.0f / scale[t], static_cast<float>(zp[t]), lo, hi, sh, K, op + m * K);
    }
  });
  return out;
}

enum class Gemm : int { kIntMm, kFloat, kInt16, kVnni, kAmx };
const char* const kGemmNames[] = {"int_mm", "float", "int16", "vnni", "amx"};
std::atomic<int> g_gemm{static_cast<int>(Gemm::kIntMm)};

// A tensor made from a weight and its scale (the dequantized weight, a kernel's layout of its levels), cached
// (cached_derived).
template <int Kind, typename Make>
std::vector<at::Tensor> cached_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, Make make) {
  return vmq_fx::linear::cached_derived<Kind, 2>({&w_in, &w_scale_in}, make);
}

// The weight as int8 [N, K], unpacked from two 4-bit values per byte where it is packed: made per call only where the
// product reads it (_int_mm), else once per cached weight.
using Int8Weight = std::function<at::Tensor()>;

// The dequantized weight w_int * w_scale as float32 [N, K].
at::Tensor float_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8,
                        const at::Tensor& w_scale) {
  return cached_weight<kFloatWeight>(w_in, w_scale_in, [&] {
    return std::vector<at::Tensor>{(w8().to(at::kFloat) * w_scale.unsqueeze(1)).contiguous()};
  })[0];
}

// The weight's levels laid out for one of the kernel's own products (linear_core.h's grouped layouts), cached: `size`
// elements of T filled by lay(level(n, k), N, K, out).
template <int Kind, typename T, typename Lay>
at::Tensor laid_out_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8,
                           int64_t (*size)(int64_t N, int64_t K), Lay lay) {
  return cached_weight<Kind>(w_in, w_scale_in, [&] {
    const at::Tensor w = w8().contiguous();
    const int64_t N = w.size(0), K = w.size(1);
    auto out = at::empty({size(N, K)}, w.options().template dtype<T>());
    const int8_t* wp = w.data_ptr<int8_t>();
    lay([&](int64_t n, int64_t k) { return wp[n * K + k]; }, N, K, static_cast<T*>(out.data_ptr()));
    return std::vector<at::Tensor>{out};
  })[0];
}

// Float [K, direct_padded_cols(N)] for direct_rows.
at::Tensor direct_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8) {
  return laid_out_weight<kDirectWeight, float>(
      w_in, w_scale_in, w8, [](int64_t N, int64_t K) { return K * direct_padded_cols(N); },
      [](const auto& w, int64_t N, int64_t K, float* out) { vmq_fx::linear::direct_weight(w, N, K, out); });
}

#if VMQ_HAS_VNNI
// Int8 [ceil(K / 4), vnni_padded_cols(N), 4] for vnni_rows.
at::Tensor vnni_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8) {
  return laid_out_weight<kVnniWeight, int8_t>(
      w_in, w_scale_in, w8, [](int64_t N, int64_t K) { return (K + 3) / 4 * vnni_padded_cols(N) * 4; },
      [](const auto& w, int64_t N, int64_t K, int8_t* out) { vmq_fx::linear::vnni_weight(w, N, K, out); });
}
#endif

#if VMQ_HAS_AMX
// Int8 B tiles [vnni_padded_cols(N) / 16, amx_groups(K), 16, 4] for amx_rows (torch's allocator aligns to 64 bytes).
at::Tensor amx_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8) {
  return laid_out_weight<kAmxWeight, int8_t>(
      w_in, w_scale_in, w8, [](int64_t N, int64_t K) { return amx_weight_size(N, K); },
      [](const auto& w, int64_t N, int64_t K, int8_t* out) { vmq_fx::linear::amx_weight(w, N, K, out); });
}
#endif

// Whether this process multiplies on AMX tiles (an AVX-512 build on a Linux CPU with AMX-INT8 that grants them).
bool amx_runs() {
#if VMQ_HAS_AMX
  return has_amx();
#else
  return false;
#endif
}

#if VMQ_HAS_MADD
// Int16 [madd_padded_cols(N) / kMaddBlock, ceil(K / 2), kMaddBlock, 2] for madd_rows.
at::Tensor madd_weight(const at::Tensor& w_in, const at::Tensor& w_scale_in, const Int8Weight& w8) {
  return laid_out_weight<kMaddWeight, int16_t>(
      w_in, w_scale_in, w8, [](int64_t N, int64_t K) { return (K + 1) / 2 * madd_padded_cols(N) * 2; },
      [](const auto& w, int64_t N, int64_t K, int16_t* out) { vmq_fx::linear::madd_weight(w, N, K, out); });
}
#endif

// Whether the int16 product runs exactly here (an x86 build; the sums within int32).
bool int16_product_exact(int64_t K, int64_t qmin, int64_t qmax, bool packed, const int32_t* zp, int64_t L) {
#if VMQ_HAS_MADD
  return madd_exact(K, qmin, qmax, packed ? 8 : 128, zp, L);
#else
  (void)K, (void)qmin, (void)qmax, (void)packed, (void)zp, (void)L;
  return false;
#endif
}

// Whether the uint8 x int8 product runs exactly here (an AVX-512 build on a CPU with VNNI; levels that move into uint8;
// the sums within int32).
bool vnni_product_exact(int64_t K, int64_t qmin, int64_t qmax, int64_t w_max, const int32_t* zp, int64_t L) {
#if VMQ_HAS_VNNI
  return vnni_exact(K, qmin, qmax, w_max, zp, L);
#else
  (void)K, (void)qmin, (void)qmax, (void)w_max, (void)zp, (void)L;
  return false;
#endif
}

// Off only for A/B benchmarks and the tests that compare the direct product with the libraries' on the same shapes.
std::atomic<bool> g_direct{true};

at::Tensor unpack_int4(const at::Tensor& packed, int64_t K) {
  const int64_t N = packed.size(0), B = packed.size(1);
  auto out = at::empty({N, K}, packed.options().dtype(at::kChar));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int v = (p[n * B + k / 2] >> ((k & 1) * 4)) & 0xF;
        o[n * K + k] = static_cast<int8_t>(v > 7 ? v - 16 : v);
      }
  });
  return out;
}


}  // namespace

namespace vmq_fx {

at::Tensor int8_linear_cpu(const at::Tensor& x, const std::optional<at::Tensor>& smooth_in,
                           const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& zp_in,
                           const at::Tensor& w_in, const at::Tensor& w_scale_in,
                           const at::Tensor& w_sum_in, const std::optional<at::Tensor>& bias_in, int64_t qmin,
                           int64_t qmax, int64_t w_bits) {
  // The contract of vmq::int8_linear, with the messages of the Python implementation (ValueError in Python).
  TORCH_CHECK_VALUE(x.dim() >= 2, "vmq.int8_linear: x must be [..., L, K], got ", x.sizes());
  const int64_t length = x.size(-2), k_in = x.size(-1);
  const bool dynamic = !scale_in.has_value();
  TORCH_CHECK_VALUE(scale_in.has_value() == zp_in.has_value(),
                    "vmq.int8_linear: act_scale and act_zero_point are both given (static) or both None (per-token "
                    "dynamic)");
  TORCH_CHECK_VALUE(dynamic || (scale_in->dim() == 1 && scale_in->size(0) == length && zp_in->dim() == 1 &&
                                zp_in->size(0) == length),
                    "vmq.int8_linear: act_scale / act_zero_point must be [L=", length, "], got ",
                    dynamic ? std::string() : c10::str(scale_in->sizes()), " / ",
                    dynamic ? std::string() : c10::str(zp_in->sizes()));
  const bool packed = w_in.scalar_type() == at::kByte;  // 4-bit weights two per byte (the stored form)
  TORCH_CHECK_VALUE(!packed || w_bits <= 4, "vmq.int8_linear: a packed (uint8) weight holds 4-bit values, but w_bits=",
                    w_bits);
  const int64_t k_w = packed ? (k_in + 1) / 2 : k_in;
  TORCH_CHECK_VALUE(w_in.dim() == 2 && w_in.size(1) == k_w && w_scale_in.dim() == 1 &&
                        w_scale_in.size(0) == w_in.size(0) && w_sum_in.dim() == 1 && w_sum_in.size(0) == w_in.size(0),
                    "vmq.int8_linear: weight ", w_in.sizes(), " (", w_bits, "-bit), scale ", w_scale_in.sizes(),
                    " and column sums ", w_sum_in.sizes(), " do not fit x with K=", k_in);
  const auto smooth = f32(smooth_in), bias = f32(bias_in);
  const at::Tensor w_scale = f32(w_scale_in), w = w_in.contiguous(), w_sum = as_contiguous(w_sum_in, at::kInt);
  const int64_t K = x.size(-1);
  const at::Tensor x2 = float_rows(x.dim() == 2 ? x : x.reshape({-1, K}));
  const int64_t M = x2.size(0);
  // Static: one scale and zero point per token position (period L); dynamic: one per row (period M).
  at::Tensor act_scale, zero_point;
  if (dynamic) {
    std::tie(act_scale, zero_point) = dynamic_token_qparams(x2, smooth, qmin, qmax);
  } else {
    act_scale = f32(*scale_in);
    zero_point = as_contiguous(*zp_in, at::kInt);
  }
  const int64_t L = act_scale.size(0);
  const int64_t shift = qmax > 127 ? 128 : 0;  // unsigned levels are moved into int8
  const Int8Weight w8 = [&] { return packed ? unpack_int4(w, K) : w; };
  const int64_t N = w.size(0);
  const int32_t* zp = zero_point.data_ptr<int32_t>();
  const int32_t* ws = w_sum.data_ptr<int32_t>();
  const float* as = act_scale.data_ptr<float>();
  const float* wsc = w_scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const auto gemm = static_cast<Gemm>(g_gemm.load(std::memory_order_relaxed));
  at::Tensor out;
  // The kernel's own products. With VNNI the uint8 x int8 product takes every exact product on its own path, and on the
  // others the small products (few rows or multiply-adds), where a library call costs more than the arithmetic, and
  // tiny K; what it cannot take exactly goes to at::_int_mm. Without VNNI the int16 product does the same but for tiny
  // K, 1.2-1.7x the direct product's float FMAs on small products (tiny K excepted, where the direct product stays
  // faster).
  const bool direct = g_direct.load(std::memory_order_relaxed);
  const bool small = small_product(M, N, K);
  const int64_t w_max = packed ? 8 : 128;
  const bool vnni = vnni_product_exact(K, qmin, qmax, w_max, zp, L) &&
                    (gemm == Gemm::kVnni || gemm == Gemm::kAmx || (direct && (small || K <= kDirectTinyK)));
#if VMQ_HAS_AMX
  // On the amx path the exact products take the tiles, but few rows and tiny K (amx_product), which stay on vnni_rows
  const bool amx = vnni && gemm == Gemm::kAmx && amx_product(M, K);
#endif
  const bool int16 = !vnni && (gemm == Gemm::kInt16 || (direct && small)) && K > kDirectTinyK &&
                     int16_product_exact(K, qmin, qmax, packed, zp, L);
  const bool float_gemm = gemm == Gemm::kFloat || (gemm == Gemm::kInt16 && !int16);
  const float* xp = x2.data_ptr<float>();
  const float* sp = smooth ? smooth->data_ptr<float>() : nullptr;
  // The kernel's own products: rows(m0, m1, out) over blocks of `rows` rows, tasks of at least 2^16 multiply-adds.
  const auto own_product = [&](int64_t rows, const auto& product) {
    out = at::empty({M, N}, x2.options());
    float* op = out.data_ptr<float>();
    at::parallel_for(0, (M + rows - 1) / rows, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, N * K)),
                     [&](int64_t begin, int64_t end) { product(begin * rows, std::min(end * rows, M), op); });
  };
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
#if VMQ_HAS_AMX
  if (amx) {
    const int8_t* wt = amx_weight(w_in, w_scale_in, w8).data_ptr<int8_t>();
    own_product(kAmxRows, [&](int64_t m0, int64_t m1, float* op) {
      amx_rows(xp, sp, as, zp, L, lo, hi, K, wt, ws, wsc, bp, N, m0, m1, op);
    });
  } else
#endif
  if (vnni) {
#if VMQ_HAS_VNNI
    const int8_t* wt = vnni_weight(w_in, w_scale_in, w8).data_ptr<int8_t>();
    own_product(kVnniRows, [&](int64_t m0, int64_t m1, float* op) {
      vnni_rows(xp, sp, as, zp, L, lo, hi, K, wt, ws, wsc, bp, N, m0, m1, op);
    });
#endif
  } else if (int16) {
#if VMQ_HAS_MADD
    const int16_t* wt = madd_weight(w_in, w_scale_in, w8).data_ptr<int16_t>();
    own_product(kMaddRows, [&](int64_t m0, int64_t m1, float* op) {
      madd_rows(xp, sp, as, zp, L, lo, hi, K, wt, wsc, bp, N, m0, m1, op);
    });
#endif
  } else if (direct &&
      direct_product(M, N, K, qmin, qmax, w_max, zp, L, /*small_products=*/true,
                     /*tiny_k=*/!float_gemm || kDirectTinyKFaster)) {
    const float* wt = direct_weight(w_in, w_scale_in, w8).data_ptr<float>();
    own_product(kDirectRows, [&](int64_t m0, int64_t m1, float* op) {
      direct_rows(xp, sp, as, zp, L, lo, hi, K, wt, wsc, bp, N, m0, m1, op);
    });
  } else if (float_gemm) {
    // Dequantized activation times dequantized weight (cached) in the fp32 GEMM, the bias added by it: one pass over
    // x, then exactly the work of the fp32 linear.
    out = at::empty({M, N}, x2.options());
    at::Tensor xdq = scratch(0, {M, K}, at::kFloat);
    float* dp = xdq.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        dequantize_row(xp + m * K, sp, 1.0f / as[m % L], static_cast<float>(zp[m % L]), lo, hi, as[m % L], K,
                       dp + m * K);
    });
    const at::Tensor wdq = float_weight(w_in, w_scale_in, w8, w_scale);
    if (bias)
      at::addmm_out(out, *bias, xdq, wdq.t());
    else
      at::mm_out(out, xdq, wdq.t());
  } else {
    const at::Tensor xq = quantize_per_token(x2, smooth, act_scale, zero_point, qmin, qmax, shift);
    // The accumulators are written where their float results go, and rescaled in place: the rescale reads and writes
    // the same cache lines instead of streaming through a second M x N buffer (~4 % of a Vim block's linears).
    out = at::empty({M, N}, x2.options());
    at::Tensor acc = out.view(at::kInt);
    if (M > 16 && K > 1) {
      at::_int_mm_out(acc, xq, w8().t());
    } else {  // at::_int_mm needs more than 16 rows, and with K = 1 its transposed weight (strides (1, 1)) comes
              // back wrong (torch 2.13, oneDNN): those take the exact int32 product instead
      acc.copy_(at::matmul(xq.to(at::kInt), w8().t().to(at::kInt)));
    }
    float* op = out.data_ptr<float>();
    const int32_t* ap = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        rescale_row(ap + m * N, zp[m % L] - static_cast<int32_t>(shift), as[m % L], ws, wsc, bp, N, op + m * N);
    });
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  out = out.view(sizes);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor quantize_per_token_cpu(const at::Tensor& x2, const std::optional<at::Tensor>& smooth,
                                  const at::Tensor& act_scale, const at::Tensor& zero_point, int64_t qmin,
                                  int64_t qmax, int64_t shift) {
  return quantize_per_token(x2.to(at::kFloat).contiguous(), f32(smooth), f32(act_scale),
                            zero_point.to(at::kInt).contiguous(), qmin, qmax, shift)
      .clone();  // out of the scratch buffer
}

void set_int8_gemm(const std::string& path) {
  const auto found = std::find(std::begin(kGemmNames), std::end(kGemmNames), path);
  TORCH_CHECK_VALUE(found != std::end(kGemmNames), "vmq_fx: unknown int8 GEMM path '", path,
                    "' (int_mm, float, int16, vnni or amx)");
  TORCH_CHECK_VALUE(VMQ_HAS_MADD || path != "int16", "vmq_fx: the int16 product needs an x86 build, this one is ",
                    VMQ_ISA_NAME);
  TORCH_CHECK_VALUE(path != "vnni" || vnni_product_exact(1, 0, 255, 128, nullptr, 0),
                    "vmq_fx: the vnni product needs an AVX-512 build on a CPU with AVX-512 VNNI, this one is ",
                    VMQ_ISA_NAME);
  TORCH_CHECK_VALUE(path != "amx" || (vnni_product_exact(1, 0, 255, 128, nullptr, 0) && amx_runs()),
                    "vmq_fx: the amx product needs an AVX-512 build on a Linux CPU with AMX-INT8 whose kernel grants "
                    "this process the tiles (arch_prctl, Linux 5.16 and later), this one is ", VMQ_ISA_NAME);
  g_gemm.store(static_cast<int>(found - std::begin(kGemmNames)));
}

std::string int8_gemm() { return kGemmNames[g_gemm.load()]; }

void set_int8_direct(bool enabled) { g_direct.store(enabled); }

// No backward: the AutogradCPU kernel refuses inputs that require grad and skips the Python autograd layer.
static void register_int8_linear(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("int8_linear", TORCH_FN(int8_linear_cpu));
  autograd_cpu.impl("int8_linear", torch::CppFunction::makeFromBoxedFunction<&no_backward>());
}
VMQ_FX_CPU_KERNELS(register_int8_linear);

}  // namespace vmq_fx
