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

#include "vec.h"

namespace vmq_fx::linear {

using VF = vmq_fx::Lanes<float>::V;
using VI = vmq_fx::Lanes<float>::I;
constexpr int kLanes = vmq_fx::Lanes<float>::W;

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

// Round half to even, as torch.round: adding and subtracting 1.5 * 2^23 rounds in the FPU's default mode. Exact for
// |v| < 2^22; larger values are far outside every level range and only need to stay large, which they do.
inline VF round_even(VF v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// The levels of one row, clamp(round(x[k] (/ smooth[k]) * inv) + z, lo, hi) as floats, handed to store(k, v) a
// vector at a time and store(k, v) for the scalar tail (both overloads of one callable).
template <typename Store>
inline void row_levels(const float* row, const float* smooth, float inv, float z, float lo, float hi, int64_t K,
                       Store&& store) {
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    VF v = loadf(row + k);
    if (smooth) v = v / loadf(smooth + k);
    v = round_even(v * inv) + z;
    v = v < lo ? VF{} + lo : v;
    v = v > hi ? VF{} + hi : v;
    store(k, v);
  }
  for (; k < K; ++k) {
    const float v = smooth ? row[k] / smooth[k] : row[k];
    store(k, std::min(std::max(std::nearbyint(v * inv) + z, lo), hi));
  }
}

// One row of levels - shift as 8-bit integers: int8 with shift 128 for unsigned levels (torch's _int_mm), uint8 with
// shift 0 (onnxruntime's MatMulInteger takes uint8 activations).
template <typename Q>
inline void quantize_row(const float* row, const float* smooth, float inv, float z, float lo, float hi, float shift,
                         int64_t K, Q* q) {
  static_assert(sizeof(Q) == 1, "levels are stored in one byte");
  struct {
    Q* q;
    float shift;
    void operator()(int64_t k, VF v) const {
      const VI levels = __builtin_convertvector(v - shift, VI);
      for (int j = 0; j < kLanes; ++j) q[k + j] = static_cast<Q>(levels[j]);
    }
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
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    VF v = loadf(row + k);
    if (smooth) v = v / loadf(smooth + k);
    vlo = v < vlo ? v : vlo;
    vhi = v > vhi ? v : vhi;
  }
  float lo = 0.0f, hi = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    lo = std::min(lo, vlo[j]);
    hi = std::max(hi, vhi[j]);
  }
  for (; k < K; ++k) {
    const float v = smooth ? row[k] / smooth[k] : row[k];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const float lo_q = static_cast<float>(qmin), hi_q = static_cast<float>(qmax);
  const float s = std::max((hi - lo) / (hi_q - lo_q), std::numeric_limits<float>::epsilon());
  *scale = s;
  *zero_point = static_cast<int32_t>(std::min(std::max(lo_q - std::nearbyint(lo / s), lo_q), hi_q));
}

// The accumulators as int32 lanes: int32 as they are, or float32 holding exact integers (oneDNN's matmul primitive
// returns its int32 sums converted to float), so that both give the same floats in rescale_row.
inline VI load_acc(const int32_t* p) { return loadi(p); }
inline VI load_acc(const float* p) { return __builtin_convertvector(loadf(p), VI); }

// out = float(acc - z * w_sum) * s * w_scale (+ bias), one row; out may be acc's own memory (each element is read
// before it is written).
template <typename Acc>
inline void rescale_row(const Acc* acc, int32_t z, float s, const int32_t* w_sum, const float* w_scale,
                        const float* bias, int64_t N, float* out) {
  int64_t n = 0;
  for (; n + kLanes <= N; n += kLanes) {
    VF v = __builtin_convertvector(load_acc(acc + n) - z * loadi(w_sum + n), VF) * s * loadf(w_scale + n);
    if (bias) v = v + loadf(bias + n);
    std::memcpy(out + n, &v, sizeof(v));
  }
  for (; n < N; ++n) {
    float v = static_cast<float>(static_cast<int32_t>(acc[n]) - z * w_sum[n]) * s * w_scale[n];
    out[n] = bias ? v + bias[n] : v;
  }
}

}  // namespace vmq_fx::linear
