// vmq::rms_norm and vmq::add_rms_norm on plain pointers: rows of d values, y = x * (1 / sqrt(mean(x^2) + eps)) * w,
// the arithmetic of the decomposed RMSNorm a graph holds (pow, mean, add, rsqrt, mul, mul), in one pass over the row
// instead of six over the tensor; add_rms_norm first adds the residual row (x + residual, kept: the residual stream
// goes on) and normalizes the sum. The core the torch ops (rms_norm.cpp) and the onnxruntime ops (ort/rms_norm_op.cpp)
// share. No torch.
//
// Each square is rounded before it is added (as pow then sum), the mean is the sum divided by d, the reciprocal square
// root is a division of 1 by a square root, and x is multiplied by it before w, as torch's ops do. Only the order of the
// sum differs from torch's (which depends on ATen's build): sixteen partial sums, element i into partial i % 16,
// combined pairwise, whatever the vector width, so that every build of this core (AVX-512, AVX2, SSE2, NEON, the
// onnxruntime library) gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace vmq_fx::norm {

constexpr int kPartials = 16;

template <typename T>
inline T rounded_square(T v) {
  T sq = v * v;
#if defined(__x86_64__)
  asm("" : "+x"(sq));  // not contracted into the add that follows (an FMA would skip the square's rounding)
#elif defined(__aarch64__)
  asm("" : "+w"(sq));
#endif
  return sq;
}

template <typename T>
inline T sum_of_squares(const T* x, int64_t d) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  static_assert(kPartials % W == 0, "a register holds a whole number of partial sums");
  constexpr int R = kPartials / W;
  V acc[R] = {};
  int64_t i = 0;
  for (; i + kPartials <= d; i += kPartials)
    for (int r = 0; r < R; ++r) acc[r] += rounded_square(load<V>(x + i + r * W));
  T part[kPartials];
  std::memcpy(part, acc, sizeof(part));  // lane l of acc[r]: partial r * W + l
  for (int j = 0; i < d; ++i, ++j) part[j] += rounded_square(x[i]);
  for (int n = kPartials / 2; n >= 1; n /= 2)
    for (int j = 0; j < n; ++j) part[j] += part[j + n];
  return part[0];
}

// One row of d values: yr = xr * (1 / sqrt(mean(xr^2) + eps)) * w.
template <typename T>
inline void rms_norm_row(const T* xr, int64_t d, const T* w, T eps, T* yr) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const T r = T(1) / std::sqrt(sum_of_squares(xr, d) / static_cast<T>(d) + eps);
  int64_t k = 0;
  for (; k + W <= d; k += W) store(yr + k, load<V>(xr + k) * r * load<V>(w + k));
  for (; k < d; ++k) yr[k] = xr[k] * r * w[k];
}

// Rows [begin, end) of x ([rows, d], contiguous) into out; w [d].
template <typename T>
inline void rms_norm_rows(const T* x, int64_t begin, int64_t end, int64_t d, const T* w, T eps, T* out) {
  for (int64_t row = begin; row < end; ++row) rms_norm_row(x + row * d, d, w, eps, out + row * d);
}

// Rows [begin, end): sum = x + residual, then out = the norm of sum (all [rows, d], contiguous); the sum is written
// once and normalized while its row is in L1.
template <typename T>
inline void add_rms_norm_rows(const T* x, const T* residual, int64_t begin, int64_t end, int64_t d, const T* w, T eps,
                              T* out, T* sum) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * d;
    const T* rr = residual + row * d;
    T* sr = sum + row * d;
    int64_t k = 0;
    for (; k + W <= d; k += W) store(sr + k, load<V>(xr + k) + load<V>(rr + k));
    for (; k < d; ++k) sr[k] = xr[k] + rr[k];
    rms_norm_row(sr, d, w, eps, out + row * d);
  }
}

}  // namespace vmq_fx::norm
