// The per-row arithmetic of the integer linear on plain pointers, shared by the torch op (int8_linear.cpp) and the
// onnxruntime ops (ort/int8_linear_ops.cpp): the activation's levels (static or per-token dynamic parameters), and the
// rescale of the int32 product. No torch: the onnxruntime library compiles it without libtorch.
//
// The levels and the float operations are those of the pure-torch path (vmq_fx/ops/int8_linear.py), in the same
// order, so that every implementation gives the same levels and the same floats.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace vmq_fx::linear {

using VF = vmq_fx::Lanes<float>::V;
using VI = vmq_fx::Lanes<float>::I;
constexpr int kLanes = vmq_fx::Lanes<float>::W;

// p moved up to the next 64-byte boundary (a buffer allocated 64 bytes longer holds what it needs from there).
template <typename T>
inline T* cache_line_aligned(T* p) {
  const auto misaligned = reinterpret_cast<uintptr_t>(p) % 64;
  return misaligned ? reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) + 64 - misaligned) : p;
}

inline VF loadf(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline VI loadi(const int32_t* p) {
  VI v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// v as rounded, kept out of a fused multiply-add with the operation that follows. GCC contracts a * b + c in C++ by
// default, and not the same way in every loop (seen in the rescale's unrolled vector loop, and x * inv fused into
// round_even's addition): the quantization rounds its product before rounding to a level and the rescale its product
// before adding the bias, as torch's separate ops do, so that every path gives the same levels and floats.
template <typename T>
inline T rounded(T v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// Round half to even, as torch.round: adding and subtracting 1.5 * 2^23 rounds in the FPU's default mode. Exact for
// |v| < 2^22; larger values are far outside every level range and only need to stay large, which they do.
inline VF round_even(VF v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// The first n (< kLanes) floats at p in a vector, the other lanes `fill`. With AVX-512 and AVX2 a masked load: a
// memcpy of a variable length is a library call, as long as the arithmetic of a row of dt_proj's 12 levels.
inline VF load_partial(const float* p, int64_t n, float fill) {
#if defined(__AVX512F__)
  return (VF)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1), p);
#elif defined(__AVX2__)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
  return (VF)_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
#else
  VF v = VF{} + fill;
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// The levels of one row, clamp(round(x[k] (/ smooth[k]) * inv) + z, lo, hi) as floats, handed to store(k, v) a
// vector at a time and, for the last K % kLanes, store(k, v) a float at a time (both overloads of one callable). The
// tail is computed as one vector too (lanes past K: 0 / 1), so that every level comes from the same instructions,
// and a row shorter than a vector (dt_proj's 12) costs one vector's work instead of K scalar divisions and roundings:
// the quantize pass of 1576 rows 1.6x faster at K = 12 and 44 (AVX-512 build, Intel Xeon, one thread).
template <typename Store>
inline void row_levels(const float* row, const float* smooth, float inv, float z, float lo, float hi, int64_t K,
                       Store&& store) {
  const auto levels = [&](VF v, VF s) {
    if (smooth) v = v / s;
    v = round_even(rounded(v * inv)) + z;  // the product rounded first, as torch's mul then round
    v = v < lo ? VF{} + lo : v;
    return v > hi ? VF{} + hi : v;
  };
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) store(k, levels(loadf(row + k), smooth ? loadf(smooth + k) : VF{}));
  if (k < K) {
    const VF v = levels(load_partial(row + k, K - k, 0.0f), smooth ? load_partial(smooth + k, K - k, 1.0f) : VF{});
    for (int64_t j = 0; j < K - k; ++j) store(k + j, v[j]);
  }
}

#if defined(__x86_64__) && !defined(__AVX512F__)
// The lanes (integers within int16) as int16 in the low 2 * kLanes bytes, by the saturating pack (no lane saturates).
inline __m128i pack_int16(VI v) {
#if defined(__AVX2__)
  return _mm_packs_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
#else
  return _mm_packs_epi32((__m128i)v, (__m128i)v);
#endif
}
#endif

// Lanes of integers in [-128, 255] stored as kLanes bytes (their low bytes: int8 or uint8), narrowed as one vector.
// GCC's __builtin_convertvector does that in one instruction with AVX-512 (vpmovdb) but lane by lane in the other
// builds (extract, mask, shift, or per lane), which made AVX2's quantize pass 4x the AVX-512 one's time per element:
// there the saturating packs (no lane saturates) and NEON's narrowing moves do it.
template <typename Q>
inline void store_bytes(VI v, Q* q) {
  static_assert(sizeof(Q) == 1, "levels are stored in one byte");
#if defined(__AVX512F__)
  typedef Q QV __attribute__((vector_size(kLanes)));
  const QV bytes = __builtin_convertvector(v, QV);
  std::memcpy(q, &bytes, sizeof(bytes));
#elif defined(__x86_64__)
  const __m128i halves = pack_int16(v);
  const __m128i bytes = std::is_signed<Q>::value ? _mm_packs_epi16(halves, halves) : _mm_packus_epi16(halves, halves);
  std::memcpy(q, &bytes, kLanes);
#elif defined(__aarch64__)
  const int16x4_t halves = vmovn_s32((int32x4_t)v);
  const int8x8_t bytes = vmovn_s16(vcombine_s16(halves, halves));
  std::memcpy(q, &bytes, kLanes);
#else
  for (int i = 0; i < kLanes; ++i) q[i] = static_cast<Q>(v[i]);
#endif
}

// One row of levels - shift as 8-bit integers: int8 with shift 128 for unsigned levels (torch's _int_mm), uint8 with
// shift 0 (onnxruntime's MatMulInteger takes uint8 activations).
template <typename Q>
inline void quantize_row(const float* row, const float* smooth, float inv, float z, float lo, float hi, float shift,
                         int64_t K, Q* q) {
  struct {
    Q* q;
    float shift;
    void operator()(int64_t k, VF v) const { store_bytes(__builtin_convertvector(v - shift, VI), q + k); }
    void operator()(int64_t k, float v) const { q[k] = static_cast<Q>(static_cast<int32_t>(v - shift)); }
  } store{q, shift};
  row_levels(row, smooth, inv, z, lo, hi, K, store);
}

// One row's levels as the float values a dequantize_per_channel gives them, (level - z) * s.
inline void dequantize_row(const float* row, const float* smooth, float inv, float z, float lo, float hi, float s,
                           int64_t K, float* out) {
  struct {
    float* out;
    float z, s;
    void operator()(int64_t k, VF v) const {
      v = (v - z) * s;
      std::memcpy(out + k, &v, sizeof(v));
    }
    void operator()(int64_t k, float v) const { out[k] = (v - z) * s; }
  } store{out, z, s};
  row_levels(row, smooth, inv, z, lo, hi, K, store);
}

// The per-token dynamic parameters of one row (/ smooth), as torchao's choose_qparams_affine computes them in float32
// (asymmetric, the range widened to hold 0, scale at least float32 epsilon).
inline void token_qparams(const float* row, const float* smooth, int64_t K, int64_t qmin, int64_t qmax, float* scale,
                          int32_t* zero_point) {
  VF vlo{}, vhi{};  // zeros: min(x, 0) and max(x, 0) are the range's ends
  const auto extend = [&](VF v, VF s) {
    if (smooth) v = v / s;
    vlo = v < vlo ? v : vlo;
    vhi = v > vhi ? v : vhi;
  };
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) extend(loadf(row + k), smooth ? loadf(smooth + k) : VF{});
  if (k < K)  // the tail as one vector, its lanes past K zeros (0 / 1: inside the range already)
    extend(load_partial(row + k, K - k, 0.0f), smooth ? load_partial(smooth + k, K - k, 1.0f) : VF{});
  float lo = 0.0f, hi = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    lo = std::min(lo, vlo[j]);
    hi = std::max(hi, vhi[j]);
  }
  const float lo_q = static_cast<float>(qmin), hi_q = static_cast<float>(qmax);
  const float s = std::max((hi - lo) / (hi_q - lo_q), std::numeric_limits<float>::epsilon());
  *scale = s;
  *zero_point = static_cast<int32_t>(std::min(std::max(lo_q - std::nearbyint(lo / s), lo_q), hi_q));
}

// out = float(acc - z * w_sum) * s * w_scale (+ bias), one row; out may be acc's own memory (each element is read
// before it is written).
inline void rescale_row(const int32_t* acc, int32_t z, float s, const int32_t* w_sum, const float* w_scale,
                        const float* bias, int64_t N, float* out) {
  int64_t n = 0;
  for (; n + kLanes <= N; n += kLanes) {
    VF v = rounded(__builtin_convertvector(loadi(acc + n) - z * loadi(w_sum + n), VF) * s * loadf(w_scale + n));
    if (bias) v = v + loadf(bias + n);
    std::memcpy(out + n, &v, sizeof(v));
  }
  for (; n < N; ++n) {
    const float v = rounded(static_cast<float>(acc[n] - z * w_sum[n]) * s * w_scale[n]);
    out[n] = bias ? v + bias[n] : v;
  }
}

// The direct product: for products too small for a GEMM library's fixed cost (a few to ~25 us a call), and for tiny K
// (dt_proj's 12), where that cost and the separate quantize and rescale passes over x and the output are the run.
// Groups of rows are quantized into a buffer of level - zero point as floats, multiplied by the weight's levels as
// floats with FMAs, and rescaled in registers. Every product and partial sum is an integer of at most
// K (qmax - qmin) max|w| <= 2^24 (direct_product), so exact in float in any order, and it equals the int32
// paths' acc - (z - shift) colsum(W): the same floats come out of the same rescale, with x read once and the output
// written once. x86 builds use it for tiny K only: the int16 product (madd_rows, below) is faster for the others.
#if VMQ_VEC_BYTES == 64 || defined(__aarch64__)
constexpr int kDirectCols = 4;  // column vectors per block: kDirectRows x kDirectCols accumulators of 32 registers
#else
constexpr int kDirectCols = 2;  // of 16 registers (AVX2, SSE2)
#endif
constexpr int kDirectRows = 4;  // direct_rows' switch covers 1-4
constexpr int64_t kDirectBlock = kDirectCols * kLanes;

// Whether the direct product runs: its sums are exact (w_max, the largest |weight level|: 128 for int8 storage, 8 for
// 4-bit; every zero point among the levels: zero_point[0, period), or null for per-token dynamic ones, which are), and
// the product is one the library multiplies slower:
// - small_products: products of few rows or few multiply-adds, where the library call has a large fixed cost (torch's
//   _int_mm: ~10-25 us a call; the fp32 GEMM path's separate dequantize pass). onnxruntime's MatMulInteger (MLAS, int8
//   dot products) has none: it multiplies those faster than these float FMAs (vim-fm-tiny, batch 1: 0.90x FP32
//   through MLAS, 0.79x through the direct product).
// - tiny_k: K <= 32 at any size (dt_proj's 12), whose quantize and rescale passes cost more than the product around
//   an integer GEMM (_int_mm path: 0.18 against 0.46 ms for Vim-T's dt_proj at batch 8). Against the fp32 GEMM path
//   the direct product wins this only with 16-float vectors (kDirectTinyKFaster): 0.20 against 0.30 ms in the
//   AVX-512 build, 0.42 against 0.33 ms in the AVX2 build with MKL capped at AVX2 (Xeon with AMX, one thread, a
//   micro-benchmark not kept). onnxruntime's MatMulInteger is measured against it in the AVX-512 build only.
constexpr int64_t kDirectMaxMacs = int64_t{1} << 20;
constexpr int64_t kDirectMaxRows = 16;
constexpr int64_t kDirectTinyK = 32;
constexpr bool kDirectTinyKFaster = kLanes >= 16;

// The largest |level - zero point| over levels in [qmin, qmax] and the zero points zero_point[0, period) (null:
// per-token dynamic ones, which lie among the levels).
inline int64_t level_span(int64_t qmin, int64_t qmax, const int32_t* zero_point, int64_t period) {
  int64_t span = qmax - qmin;
  if (zero_point)
    for (int64_t t = 0; t < period; ++t)
      span = std::max({span, qmax - int64_t{zero_point[t]}, int64_t{zero_point[t]} - qmin});
  return span;
}

// A product of few rows or few multiply-adds (direct_product's small_products).
inline bool small_product(int64_t M, int64_t N, int64_t K) {
  return M <= kDirectMaxRows || M * N * K <= kDirectMaxMacs;
}

inline bool direct_product(int64_t M, int64_t N, int64_t K, int64_t qmin, int64_t qmax, int64_t w_max,
                           const int32_t* zero_point, int64_t period, bool small_products, bool tiny_k) {
  if (K * (qmax - qmin) * w_max > (int64_t{1} << 24)) return false;
  if (!((tiny_k && K <= kDirectTinyK) || (small_products && small_product(M, N, K)))) return false;
  return !zero_point ||
         std::all_of(zero_point, zero_point + period, [&](int32_t z) { return qmin <= z && z <= qmax; });
}

// The weight's levels w(n, k) as T [ceil(K / G), Np, G]: groups of G consecutive k side by side, the layout of the
// kernels' own products (G = 1 for the direct product's float FMAs, 2 for vpmaddwd, 4 for vpdpbusd), zero past N and K.
template <int G, typename T, typename Level>
inline void grouped_weight(Level&& w, int64_t N, int64_t K, int64_t Np, T* out) {
  for (int64_t g = 0; g < (K + G - 1) / G; ++g)
    for (int64_t n = 0; n < Np; ++n)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t k = G * g + j;
        out[(g * Np + n) * G + j] = n < N && k < K ? static_cast<T>(w(n, k)) : T(0);
      }
}

// The weight's levels for direct_rows: w(n, k) -> float [K, padded_cols(N)], the columns past N zero.
inline int64_t direct_padded_cols(int64_t N) { return (N + kDirectBlock - 1) / kDirectBlock * kDirectBlock; }

template <typename Level>
inline void direct_weight(Level&& w, int64_t N, int64_t K, float* out) {
  grouped_weight<1>(w, N, K, direct_padded_cols(N), out);
}

// rescale_row's arithmetic on a block of exact sums (R rows x Cols vectors of columns from n0, as floats):
// float(sum) * s * w_scale (+ bias), columns past N dropped.
template <int R, int Cols>
inline void rescale_block(const VF* acc, const float* s, const float* w_scale, const float* bias, int64_t N,
                          int64_t n0, float* out) {
  if (n0 + Cols * kLanes <= N) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < Cols; ++j) {
        const int64_t n = n0 + j * kLanes;
        VF v = rounded(acc[r * Cols + j] * s[r] * loadf(w_scale + n));
        if (bias) v = v + loadf(bias + n);
        std::memcpy(out + r * N + n, &v, sizeof(v));
      }
  } else {  // the last, partial block of columns
    for (int r = 0; r < R; ++r) {
      float sums[Cols * kLanes];
      std::memcpy(sums, acc + r * Cols, sizeof(sums));
      for (int64_t n = n0; n < N; ++n) {
        const float v = rounded(sums[n - n0] * s[r] * w_scale[n]);
        out[r * N + n] = bias ? v + bias[n] : v;
      }
    }
  }
}

// Rows [0, R) and columns [n0, n0 + kDirectBlock) of out. q holds the rows' levels - zero point, R rows of K floats.
template <int R>
inline void direct_block(const float* q, int64_t K, const float* wt, int64_t N, int64_t n0, const float* s,
                         const float* w_scale, const float* bias, float* out) {
  const int64_t Np = direct_padded_cols(N);
  VF acc[R * kDirectCols];
#pragma GCC unroll 16
  for (int i = 0; i < R * kDirectCols; ++i) acc[i] = VF{};
  const float* wp = wt + n0;
  for (int64_t k = 0; k < K; ++k, wp += Np) {
    VF w[kDirectCols];
#pragma GCC unroll 4
    for (int j = 0; j < kDirectCols; ++j) w[j] = loadf(wp + j * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const VF a = q[r * K + k] - VF{};
#pragma GCC unroll 4
      for (int j = 0; j < kDirectCols; ++j) acc[r * kDirectCols + j] += a * w[j];
    }
  }
  rescale_block<R, kDirectCols>(acc, s, w_scale, bias, N, n0, out);
}

// Rows [m0, m1) of out = rescale(levels(x) x w): x [M, K] (/ smooth), the activation parameters of row m at
// scale[m % period] / zero_point[m % period], levels in [lo, hi]; wt from direct_weight; out [M, N]; direct_product
// holds. Rows go in groups whose levels stay in L1, each group once over the weight a block of columns at a time (the
// block's K x kDirectBlock panel stays in cache across the group's rows).
inline void direct_rows(const float* x, const float* smooth, const float* scale, const int32_t* zero_point,
                        int64_t period, float lo, float hi, int64_t K, const float* wt, const float* w_scale,
                        const float* bias, int64_t N, int64_t m0, int64_t m1, float* out) {
  // A weight that fits in L1 is swept whole per block of rows, which keeps the block's output rows in cache.
  const bool small_weight = K * direct_padded_cols(N) <= 8192;
  const int64_t group = small_weight ? kDirectRows : std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)) * kDirectRows;
  thread_local std::vector<float> levels, scales;
  levels.resize(static_cast<size_t>(std::min(group, m1 - m0) * K));
  scales.resize(static_cast<size_t>(group));
  for (int64_t g0 = m0; g0 < m1; g0 += group) {
    const int64_t g1 = std::min(g0 + group, m1);
    for (int64_t m = g0; m < g1; ++m) {
      const int64_t t = m % period;
      scales[m - g0] = scale[t];
      // level - zero point, exactly: dequantize_row with a unit scale; as quantize_per_channel: x * (1 / scale)
      dequantize_row(x + m * K, smooth, 1.0f / scale[t], static_cast<float>(zero_point[t]), lo, hi, 1.0f, K,
                     levels.data() + (m - g0) * K);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kDirectBlock) {
      for (int64_t m = g0; m < g1; m += kDirectRows) {
        const float* q = levels.data() + (m - g0) * K;
        const float* s = scales.data() + (m - g0);
        float* o = out + m * N;
        switch (std::min<int64_t>(kDirectRows, g1 - m)) {
          case 4: direct_block<4>(q, K, wt, N, n0, s, w_scale, bias, o); break;
          case 3: direct_block<3>(q, K, wt, N, n0, s, w_scale, bias, o); break;
          case 2: direct_block<2>(q, K, wt, N, n0, s, w_scale, bias, o); break;
          default: direct_block<1>(q, K, wt, N, n0, s, w_scale, bias, o); break;
        }
      }
    }
  }
}

// The uint8 x int8 product, for AVX-512 builds on CPUs with AVX-512 VNNI (has_vnni; native.int8_gemm_path's "vnni"):
// vpdpbusd multiplies 4 uint8 activation levels by 4 int8 weight levels and adds them into each int32 lane, exactly
// (no saturation), 64 multiply-adds an instruction. The levels are stored as uint8 (signed ones moved up by 128, the
// zero point with them), the weight's levels as int8 groups of 4 consecutive k ([ceil(K / 4), padded N, 4], zero past
// K and N), and acc - z * w_sum is converted to float for rescale_block: the floats of the int32 paths, with the
// quantization and the rescale in the product's pass (no int32 buffer, no library call). Vim-T's
// linears through vmq::int8_linear, Intel Xeon with AVX-512 VNNI (no AMX), one thread, interleaved with the _int_mm
// path in one process (ms, this against _int_mm with its quantize and rescale passes): batch 8 in_proj 1.19 / 1.18
// (both at the CPU's vpdpbusd rate), out_proj 0.78 / 0.77, x_proj 0.39 / 0.46, dt_proj 0.27 / 0.32; batch 1 in_proj
// 0.17 / 0.22, x_proj 0.052 / 0.067. In a standalone micro-benchmark (not kept) 8 rows x 2 column vectors was the
// fastest block for in_proj at batch 8 (4 x 4 1.28x its time, 4 x 2 1.49x, 6 x 4 and 8 x 3 within 3 %, 12 x 2 2.1x).
// The rows of a task are quantized first, then multiplied a panel of columns at a time whose weight stays in L2
// (kVnniPanelBytes) while every block of rows passes over it. Compiled for VNNI by target attribute (the
// build's flags stop at AVX-512 BW / DQ / VL) and taken only where the CPU has it.
#if defined(__AVX512F__)
#define VMQ_HAS_VNNI 1
constexpr int kVnniCols = 2;  // column vectors per block
constexpr int kVnniRows = 8;  // 16 int32 accumulators; vnni_rows' switch covers 1-8
constexpr int64_t kVnniBlock = kVnniCols * kLanes;
constexpr int64_t kVnniPanelBytes = int64_t{256} << 10;

inline bool has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

// What moves levels in [qmin, qmax] into uint8 (0 or 128), or -1 where none does.
inline int vnni_offset(int64_t qmin, int64_t qmax) {
  if (0 <= qmin && qmax <= 255) return 0;
  if (-128 <= qmin && qmax <= 127) return 128;
  return -1;
}

// Whether vnni_rows runs here and exactly: a CPU with VNNI, levels that move into uint8, every sum within int32 (w_max:
// the largest |weight level|; zero_point[0, period) the zero points, or null for per-token dynamic ones).
inline bool vnni_exact(int64_t K, int64_t qmin, int64_t qmax, int64_t w_max, const int32_t* zero_point,
                       int64_t period) {
  if (vnni_offset(qmin, qmax) < 0 || K * 255 * w_max >= (int64_t{1} << 31)) return false;
  return K * level_span(qmin, qmax, zero_point, period) * w_max < (int64_t{1} << 31) && has_vnni();
}

inline int64_t vnni_padded_cols(int64_t N) { return (N + kVnniBlock - 1) / kVnniBlock * kVnniBlock; }

// The weight's levels for vnni_rows: w(n, k) -> int8 [ceil(K / 4), vnni_padded_cols(N), 4].
template <typename Level>
inline void vnni_weight(Level&& w, int64_t N, int64_t K, int8_t* out) {
  grouped_weight<4>(w, N, K, vnni_padded_cols(N), out);
}

// rescale_block on the exact sums acc - z * w_sum of R rows x Cols vectors of uint8 x int8 accumulators.
template <int R, int Cols = kVnniCols>
inline void rescale_uint8_sums(const __m512i* acc, const int32_t* z, const int32_t* w_sum, const float* s,
                               const float* w_scale, const float* bias, int64_t N, int64_t n0, float* out) {
  VF sums[R * Cols];
#pragma GCC unroll 4
  for (int j = 0; j < Cols; ++j) {
    const int64_t n = n0 + j * kLanes, left = std::max<int64_t>(0, std::min<int64_t>(kLanes, N - n));
    const __m512i ws = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << left) - 1), w_sum + n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      sums[r * Cols + j] = (VF)_mm512_cvtepi32_ps(
          _mm512_sub_epi32(acc[r * Cols + j], _mm512_mullo_epi32(_mm512_set1_epi32(z[r]), ws)));
  }
  rescale_block<R, Cols>(sums, s, w_scale, bias, N, n0, out);
}

// Rows [0, R) and columns [n0, n0 + Cols * kLanes) of out; q holds R rows of 4 * G uint8 levels, z their zero points
// (moved as the levels).
template <int R, int Cols = kVnniCols>
__attribute__((target("avx512vnni"))) inline void vnni_block(const uint8_t* q, int64_t G, const int8_t* wt,
                                                             int64_t Np, int64_t n0, const int32_t* z,
                                                             const int32_t* w_sum, const float* s,
                                                             const float* w_scale, const float* bias, int64_t N,
                                                             float* out) {
  __m512i acc[R * Cols];
#pragma GCC unroll 16
  for (int i = 0; i < R * Cols; ++i) acc[i] = _mm512_setzero_si512();
  const int8_t* wp = wt + 4 * n0;
  for (int64_t g = 0; g < G; ++g, wp += 4 * Np) {
    __m512i w[Cols];
#pragma GCC unroll 4
    for (int j = 0; j < Cols; ++j) w[j] = _mm512_loadu_si512(wp + j * 4 * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + (r * G + g) * 4, sizeof(quad));
      const __m512i a = _mm512_set1_epi32(quad);
      // vpdpbusd by asm: with _mm512_dpbusd_epi32 GCC copies every accumulator between registers (and the stack) at
      // each step, which made the product 1.15-2x slower (by block shape, in the micro-benchmark above).
#pragma GCC unroll 4
      for (int j = 0; j < Cols; ++j) asm("vpdpbusd %2, %1, %0" : "+v"(acc[r * Cols + j]) : "v"(a), "v"(w[j]));
    }
  }
  rescale_uint8_sums<R, Cols>(acc, z, w_sum, s, w_scale, bias, N, n0, out);
}

// vnni_block for the first `rows` (1 to kVnniRows) rows.
template <int Cols>
__attribute__((target("avx512vnni"))) inline void vnni_block_rows(int64_t rows, const uint8_t* q, int64_t G,
                                                                  const int8_t* wt, int64_t Np, int64_t n0,
                                                                  const int32_t* z, const int32_t* w_sum,
                                                                  const float* s, const float* w_scale,
                                                                  const float* bias, int64_t N, float* o) {
  switch (rows) {
    case 8: vnni_block<8, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 7: vnni_block<7, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 6: vnni_block<6, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 5: vnni_block<5, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 4: vnni_block<4, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 3: vnni_block<3, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    case 2: vnni_block<2, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
    default: vnni_block<1, Cols>(q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o); break;
  }
}

// A task's rows of uint8 levels (signed ones moved up by 128), `stride` bytes apart from a 64-byte boundary, zero past
// K and past the last row up to `padded_rows` (whole AMX tiles); their scales and zero points (moved as the levels).
struct UintLevels {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  std::vector<int32_t> zero_points;
  uint8_t* base = nullptr;
  int64_t stride = 0;

  uint8_t* row(int64_t r) const { return base + r * stride; }

  void quantize(const float* x, const float* smooth, const float* scale, const int32_t* zero_point, int64_t period,
                float lo, float hi, int64_t K, int64_t stride_, int64_t m0, int64_t m1, int64_t padded_rows) {
    const int offset = vnni_offset(static_cast<int64_t>(lo), static_cast<int64_t>(hi));
    const int64_t rows = m1 - m0;
    stride = stride_;
    // AMX tile rows that straddle cache lines load at two thirds the speed (amx_rows)
    bytes.assign(static_cast<size_t>(padded_rows * stride + 64), uint8_t{0});
    base = cache_line_aligned(bytes.data());
    scales.resize(static_cast<size_t>(rows));
    zero_points.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = (m0 + r) % period;
      scales[r] = scale[t];
      zero_points[r] = zero_point[t] + offset;
      // as quantize_per_channel: x * (1 / scale)
      quantize_row(x + (m0 + r) * K, smooth, 1.0f / scale[t], static_cast<float>(zero_point[t]), lo, hi,
                   static_cast<float>(-offset), K, row(r));
    }
  }
};

// Rows [m0, m1) of out = rescale(levels(x) x w), as direct_rows (the same arguments; vnni_exact holds), with wt from
// vnni_weight and the column sums w_sum of the weight's levels.
__attribute__((target("avx512vnni"))) inline void vnni_rows(const float* x, const float* smooth, const float* scale,
                                                            const int32_t* zero_point, int64_t period, float lo,
                                                            float hi, int64_t K, const int8_t* wt,
                                                            const int32_t* w_sum, const float* w_scale,
                                                            const float* bias, int64_t N, int64_t m0, int64_t m1,
                                                            float* out) {
  const int64_t G = (K + 3) / 4, Np = vnni_padded_cols(N), rows = m1 - m0;
  thread_local UintLevels levels;
  levels.quantize(x, smooth, scale, zero_point, period, lo, hi, K, 4 * G, m0, m1, rows);
  const int32_t* zs = levels.zero_points.data();
  const float* scales = levels.scales.data();
  const int64_t panel = std::max<int64_t>(1, kVnniPanelBytes / (4 * G * kVnniBlock)) * kVnniBlock;
  for (int64_t p0 = 0; p0 < N; p0 += panel) {
    const int64_t p1 = std::min(N, p0 + panel);
    for (int64_t r = 0; r < rows; r += kVnniRows) {
      const uint8_t* q = levels.row(r);
      const int32_t* z = zs + r;
      const float* s = scales + r;
      float* o = out + (m0 + r) * N;
      const int64_t block_rows = std::min<int64_t>(kVnniRows, rows - r);
      // A last block of at most one vector of columns multiplies one (x_proj's 44 columns: 48 instead of 64)
      for (int64_t n0 = p0; n0 < p1; n0 += kVnniBlock) {
        if (N - n0 <= kLanes)
          vnni_block_rows<1>(block_rows, q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o);
        else
          vnni_block_rows<kVnniCols>(block_rows, q, G, wt, Np, n0, z, w_sum, s, w_scale, bias, N, o);
      }
    }
  }
}

// The uint8 x int8 product on AMX tiles, for AVX-512 builds on Linux CPUs with AMX-INT8 (Sapphire Rapids and later:
// has_amx; native.int8_gemm_path's "amx", and the onnxruntime op there): tdpbusd multiplies a 16 x 64 tile of uint8
// levels by a 64 x 16 tile of int8 weight levels into a 16 x 16 tile of int32 sums, 16384 multiply-adds an instruction
// (vpdpbusd: 64). A block of 32 rows x 32 columns accumulates in four C tiles (tiles 0-3; A tiles 4-5, B tiles 6-7),
// goes through a 4 KB buffer and rescale_uint8_sums: the same levels and floats as vnni_rows, quantized and rescaled
// in the product's pass. The weight is laid out tile by tile (amx_weight: each B tile 1 KB in a row; read through the
// vnni layout's 3 KB row stride, in_proj at batch 8 took 1.15x the time) and the levels' rows start on cache lines
// (straddling two lines: 1.35x). Vim-T's linears, one thread, Intel Xeon with AMX, a standalone harness of this file
// (not kept), against vnni_rows: batch 8 in_proj 0.51 / 1.14 ms, out_proj 0.32 / 0.63, x_proj 0.22 / 0.33; batch 1
// in_proj 0.056 / 0.137, x_proj 0.026 / 0.038. Of in_proj's 0.51 ms at batch 8 the quantization takes ~0.08, the tiles
// ~0.14 and the rescale, which writes the 4.8 MB output, the rest; rescaling each block while the next one multiplies
// (two buffers) gained nothing measurable, nor did walking the rows in super-blocks of 64-256 for cache reuse. Tiny K
// (dt_proj's 12, padded to 64) and a few rows are slower there and stay on vnni_rows (amx_product). AMX is a thread's
// state under Linux: the process asks for it once (arch_prctl), each call configures its thread's tiles and releases
// them.
#if defined(__linux__)
#define VMQ_HAS_AMX 1

constexpr int64_t kAmxTileRows = 16;            // rows of a tile; groups of 4 k in a B tile
constexpr int64_t kAmxRows = 2 * kAmxTileRows;  // rows of a block: two A tiles
static_assert(kVnniBlock == 2 * kAmxTileRows, "a block's columns are two B tiles");

// Whether the CPU has AMX-INT8 and Linux lets this process use its tile data (asked once; Linux 5.16 and later).
inline bool has_amx() {
  static const bool ok = [] {
    unsigned eax = 7, ebx = 0, ecx = 0, edx = 0;
    __asm__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (!((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
    constexpr long kArchPrctl = 158, kReqXcompPerm = 0x1023, kXtiledata = 18;  // x86-64 syscall, <asm/prctl.h>
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(kArchPrctl), "D"(kReqXcompPerm), "S"(kXtiledata) : "rcx", "r11",
                     "memory");
    return ret == 0;
  }();
  return ok;
}

// Whether amx_rows runs here and is the faster product (else vnni_rows): a block's rows and more than tiny K.
inline bool amx_product(int64_t M, int64_t K) { return M >= kAmxRows && K > kDirectTinyK && has_amx(); }

inline int64_t amx_groups(int64_t K) { return ((K + 3) / 4 + kAmxTileRows - 1) / kAmxTileRows * kAmxTileRows; }
inline int64_t amx_weight_size(int64_t N, int64_t K) { return vnni_padded_cols(N) * amx_groups(K) * 4; }

// The weight's levels for amx_rows: w(n, k) -> int8 B tiles [vnni_padded_cols(N) / 16][amx_groups(K)][16][4]: the
// tiles of 16 columns one after the other, each 16 groups of 4 k of its 16 columns (64 bytes a row), zero past N and K.
template <typename Level>
inline void amx_weight(Level&& w, int64_t N, int64_t K, int8_t* out) {
  const int64_t G = amx_groups(K), Np = vnni_padded_cols(N);
  for (int64_t c = 0; c < Np / kAmxTileRows; ++c)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < kAmxTileRows; ++j)
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t n = kAmxTileRows * c + j, k = 4 * g + i;
          out[((c * G + g) * kAmxTileRows + j) * 4 + i] = n < N && k < K ? static_cast<int8_t>(w(n, k)) : int8_t{0};
        }
}

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// rescale_uint8_sums on a block's sums ([kAmxRows][kVnniBlock] int32), `rows` of them from row r of the task.
inline void rescale_amx_block(const int32_t* sums, int64_t rows, const int32_t* z, const int32_t* w_sum,
                              const float* s, const float* w_scale, const float* bias, int64_t N, int64_t n0,
                              float* out) {
  for (int64_t r = 0; r < rows; r += kVnniRows) {
    const __m512i* acc = reinterpret_cast<const __m512i*>(sums + r * kVnniBlock);
    float* o = out + r * N;
    switch (std::min<int64_t>(kVnniRows, rows - r)) {
      case 8: rescale_uint8_sums<8>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 7: rescale_uint8_sums<7>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 6: rescale_uint8_sums<6>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 5: rescale_uint8_sums<5>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 4: rescale_uint8_sums<4>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 3: rescale_uint8_sums<3>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      case 2: rescale_uint8_sums<2>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
      default: rescale_uint8_sums<1>(acc, z + r, w_sum, s + r, w_scale, bias, N, n0, o); break;
    }
  }
}

// Rows [m0, m1) of out = rescale(levels(x) x w), as vnni_rows (the same arguments; vnni_exact and has_amx hold), with
// wt from amx_weight (64-byte aligned).
__attribute__((target("amx-tile,amx-int8"))) inline void amx_rows(const float* x, const float* smooth,
                                                                  const float* scale, const int32_t* zero_point,
                                                                  int64_t period, float lo, float hi, int64_t K,
                                                                  const int8_t* wt, const int32_t* w_sum,
                                                                  const float* w_scale, const float* bias, int64_t N,
                                                                  int64_t m0, int64_t m1, float* out) {
  const int64_t G = amx_groups(K), rows = m1 - m0, stride = 4 * G;
  thread_local UintLevels levels;
  levels.quantize(x, smooth, scale, zero_point, period, lo, hi, K, stride, m0, m1,
                  (rows + kAmxRows - 1) / kAmxRows * kAmxRows);
  static const AmxConfig config;
  _tile_loadconfig(&config);
  alignas(64) int32_t sums[kAmxRows * kVnniBlock];
  constexpr int64_t row_bytes = kVnniBlock * sizeof(int32_t);
  const int64_t panel = std::max<int64_t>(1, kVnniPanelBytes / (stride * kVnniBlock)) * kVnniBlock;
  for (int64_t p0 = 0; p0 < N; p0 += panel) {
    const int64_t p1 = std::min(N, p0 + panel);
    for (int64_t r = 0; r < rows; r += kAmxRows) {
      const uint8_t* a = levels.row(r);
      for (int64_t n0 = p0; n0 < p1; n0 += kVnniBlock) {
        const int8_t* b = wt + (n0 / kAmxTileRows) * G * 64;  // its two B tiles' columns
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t g = 0; g < G; g += kAmxTileRows) {
          _tile_loadd(4, a + 4 * g, stride);
          _tile_loadd(5, a + kAmxTileRows * stride + 4 * g, stride);
          _tile_loadd(6, b + g * 64, 64);
          _tile_loadd(7, b + G * 64 + g * 64, 64);
          _tile_dpbusd(0, 4, 6);
          _tile_dpbusd(1, 4, 7);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(0, sums, row_bytes);
        _tile_stored(1, sums + kLanes, row_bytes);
        _tile_stored(2, sums + kAmxTileRows * kVnniBlock, row_bytes);
        _tile_stored(3, sums + kAmxTileRows * kVnniBlock + kLanes, row_bytes);
        rescale_amx_block(sums, std::min(kAmxRows, rows - r), levels.zero_points.data() + r, w_sum,
                          levels.scales.data() + r, w_scale, bias, N, n0, out + (m0 + r) * N);
      }
    }
  }
  _tile_release();
}
#else
#define VMQ_HAS_AMX 0
#endif
#else
#define VMQ_HAS_VNNI 0
#define VMQ_HAS_AMX 0
#endif

// The int16 product, for x86 CPUs without int8 dot products (no VNNI / AMX: native.int8_gemm_path's "int16"), where
// torch._int_mm is many times slower than the fp32 GEMM. The levels minus zero point (|.| <= 255) and the weight's
// levels are int16; vpmaddwd multiplies pairs of them and adds each pair into an int32 (16 multiply-adds per AVX2
// instruction, two a cycle), and the accumulating vpaddd issues on a third vector port: ~1.5x the fp32 FMA rate in
// issue slots. Exact (int32 sums), so its floats are those of the int32 paths. Each block of kMaddRows rows is
// quantized into a buffer (in L1) and multiplied across all columns, the weight streaming from L2 one column block
// after another, each block's pairs contiguous (madd_weight), the output written row by row and rescaled in
// registers. Contiguous blocks rather than rows of pairs across all N (3 KB apart in in_proj, past the stride the L1
// prefetcher follows): Vim-T's in_proj 1.07x / 1.05x as fast at batch 1 / 8, out_proj 1.03x / 1.01x, x_proj 0.96x at
// batch 1 (medians of five alternating runs of a micro-benchmark of the AVX2 build, Intel Xeon with AMX, one thread;
// the same bits); in bench/cpu_latency.py's linears table (--emulate-avx2) within its run-to-run noise. Against MKL
// capped at AVX2 in that table (Vim-T at batch 8, quantization and rescale included, Intel Xeon with AMX): in_proj
// 1.21x, out_proj 1.24x, x_proj 0.98x as fast (over this and two earlier runs: 1.14-1.33x, 1.20-1.32x,
// 0.98-1.06x). In a micro-benchmark (not kept) 4 x 2 and 6 x 2 blocks were 1.3x slower on in_proj, and walking
// columns before rows (the direct product's order) 1.2x. Tiny K (dt_proj's 12) is slower than the fp32 GEMM there
// (0.35 against 0.15 ms) and stays on it.
#if defined(__x86_64__)
#define VMQ_HAS_MADD 1
constexpr int kMaddCols = 2;  // vectors of kLanes int32 columns
constexpr int kMaddRows = 5;  // 10 accumulators of 16 registers (AVX2)
constexpr int64_t kMaddBlock = kMaddCols * kLanes;

inline VI madd(VI pairs, VI w) {
#if defined(__AVX512F__)
  return (VI)_mm512_madd_epi16((__m512i)pairs, (__m512i)w);
#elif defined(__AVX2__)
  return (VI)_mm256_madd_epi16((__m256i)pairs, (__m256i)w);
#else
  return (VI)_mm_madd_epi16((__m128i)pairs, (__m128i)w);
#endif
}

// Lanes of integers within int16 stored as kLanes int16 (no lane saturates).
inline void store_int16(VI v, int16_t* q) {
#if defined(__AVX512F__)
  typedef int16_t HV __attribute__((vector_size(2 * kLanes)));
  const HV halves = __builtin_convertvector(v, HV);
  std::memcpy(q, &halves, sizeof(halves));
#else
  const __m128i halves = pack_int16(v);
  std::memcpy(q, &halves, 2 * kLanes);
#endif
}

// Whether the int16 product is exact: every |level - zero point| within int16 and every sum within int32.
inline bool madd_exact(int64_t K, int64_t qmin, int64_t qmax, int64_t w_max, const int32_t* zero_point,
                       int64_t period) {
  const int64_t span = level_span(qmin, qmax, zero_point, period);
  return span <= 32767 && K * span * w_max < (int64_t{1} << 31);
}

inline int64_t madd_padded_cols(int64_t N) { return (N + kMaddBlock - 1) / kMaddBlock * kMaddBlock; }

// The weight's levels for madd_rows: w(n, k) -> int16 [madd_padded_cols(N) / kMaddBlock, ceil(K / 2), kMaddBlock, 2],
// a block of columns after another, pairs of consecutive k side by side, zero past N and K.
template <typename Level>
inline void madd_weight(Level&& w, int64_t N, int64_t K, int16_t* out) {
  const int64_t K2 = (K + 1) / 2, Np = madd_padded_cols(N);
  for (int64_t n = 0; n < Np; ++n)
    for (int64_t p = 0; p < K2; ++p)
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t k = 2 * p + j;
        out[((n / kMaddBlock * K2 + p) * kMaddBlock + n % kMaddBlock) * 2 + j] =
            n < N && k < K ? static_cast<int16_t>(w(n, k)) : int16_t{0};
      }
}

// Rows [0, R) and columns [n0, n0 + kMaddBlock) of out; q holds R rows of 2 * K2 int16 levels - zero point.
template <int R>
inline void madd_block(const int16_t* q, int64_t K2, const int16_t* wt, int64_t n0, const float* s,
                       const float* w_scale, const float* bias, int64_t N, float* out) {
  VI acc[R * kMaddCols];
#pragma GCC unroll 16
  for (int i = 0; i < R * kMaddCols; ++i) acc[i] = VI{};
  const int16_t* wp = wt + n0 * 2 * K2;  // the column block's pairs
  for (int64_t kp = 0; kp < K2; ++kp, wp += 2 * kMaddBlock) {
    VI w[kMaddCols];
#pragma GCC unroll 4
    for (int j = 0; j < kMaddCols; ++j) std::memcpy(&w[j], wp + j * 2 * kLanes, sizeof(VI));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * 2 * K2 + 2 * kp, sizeof(pair));
      const VI a = VI{} + pair;
#pragma GCC unroll 4
      for (int j = 0; j < kMaddCols; ++j) acc[r * kMaddCols + j] += madd(a, w[j]);
    }
  }
  VF sums[R * kMaddCols];
#pragma GCC unroll 16
  for (int i = 0; i < R * kMaddCols; ++i) sums[i] = __builtin_convertvector(acc[i], VF);
  rescale_block<R, kMaddCols>(sums, s, w_scale, bias, N, n0, out);
}

// Rows [m0, m1) of out = rescale(levels(x) x w), as direct_rows (the same arguments), with wt from madd_weight;
// madd_exact holds.
inline void madd_rows(const float* x, const float* smooth, const float* scale, const int32_t* zero_point,
                      int64_t period, float lo, float hi, int64_t K, const int16_t* wt, const float* w_scale,
                      const float* bias, int64_t N, int64_t m0, int64_t m1, float* out) {
  const int64_t K2 = (K + 1) / 2;
  thread_local std::vector<int16_t> levels;
  levels.assign(static_cast<size_t>(kMaddRows * 2 * K2), int16_t{0});  // the pad past an odd K stays 0
  float scales[kMaddRows];
  for (int64_t m = m0; m < m1; m += kMaddRows) {
    const int64_t rows = std::min<int64_t>(kMaddRows, m1 - m);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = (m + r) % period;
      scales[r] = scale[t];
      const float z = static_cast<float>(zero_point[t]);
      int16_t* q = levels.data() + r * 2 * K2;
      struct {
        int16_t* q;
        float z;
        void operator()(int64_t k, VF v) const { store_int16(__builtin_convertvector(v - z, VI), q + k); }
        void operator()(int64_t k, float v) const { q[k] = static_cast<int16_t>(v - z); }
      } store{q, z};
      // as quantize_per_channel: x * (1 / scale)
      row_levels(x + (m + r) * K, smooth, 1.0f / scale[t], z, lo, hi, K, store);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kMaddBlock) {
      float* o = out + m * N;
      switch (rows) {
        case 5: madd_block<5>(levels.data(), K2, wt, n0, scales, w_scale, bias, N, o); break;
        case 4: madd_block<4>(levels.data(), K2, wt, n0, scales, w_scale, bias, N, o); break;
        case 3: madd_block<3>(levels.data(), K2, wt, n0, scales, w_scale, bias, N, o); break;
        case 2: madd_block<2>(levels.data(), K2, wt, n0, scales, w_scale, bias, N, o); break;
        default: madd_block<1>(levels.data(), K2, wt, n0, scales, w_scale, bias, N, o); break;
      }
    }
  }
}
#else
#define VMQ_HAS_MADD 0
#endif

}  // namespace vmq_fx::linear
