// The transform of vmq::hadamard_transform on plain pointers: rows of d = m * b values (b a power of two) times
// kron(odd, H_b), H_b Sylvester's Walsh-Hadamard matrix / sqrt(b). The core the torch op (hadamard.cpp) and the
// onnxruntime op (ort/hadamard_op.cpp) share. No torch.
//
// The fast Walsh-Hadamard transform is log2(b) butterfly stages (a + c, a - c), the strides below the vector width by
// lane shuffles inside a register. A segment of up to kRegisterVectors vectors is loaded once, transformed in
// registers and stored once; a longer one (or one shorter than a vector) is copied into a work buffer (L1: a few KiB)
// and transformed there. With m > 1 the m transformed segments of a row are then mixed by the m x m matrix (the
// normalization folded into its coefficients) into the output row. Every path runs the same stages in the same order,
// so the transform gives the same bits on every build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "vec.h"

namespace vmq_fx::hadamard {

template <typename T>
struct LaneIndex;
template <>
struct LaneIndex<float> {
  using E = int32_t;
  typedef int32_t M __attribute__((vector_size(VMQ_VEC_BYTES)));
};
template <>
struct LaneIndex<double> {
  using E = int64_t;
  typedef int64_t M __attribute__((vector_size(VMQ_VEC_BYTES)));
};

// One butterfly stage of stride S < W inside a vector: lane i becomes v[i] + v[i ^ S] where bit S of i is clear, and
// v[i ^ S] - v[i] where it is set (a + c and a - c of the pair).
template <typename T, int S, size_t... I>
inline typename Lanes<T>::V stage_in_vector(typename Lanes<T>::V v, std::index_sequence<I...>) {
  using V = typename Lanes<T>::V;
  const V sign = {((I & S) ? T(-1) : T(1))...};
#if defined(__clang__)
  const V partner = __builtin_shufflevector(v, v, static_cast<int>(I ^ S)...);
#else
  using M = typename LaneIndex<T>::M;
  using E = typename LaneIndex<T>::E;
  const V partner = __builtin_shuffle(v, M{static_cast<E>(I ^ S)...});
#endif
  return v * sign + partner;
}

template <typename T, int S = 1>
inline typename Lanes<T>::V stages_in_vector(typename Lanes<T>::V v) {
  if constexpr (S >= Lanes<T>::W) {
    return v;
  } else {
    return stages_in_vector<T, 2 * S>(stage_in_vector<T, S>(v, std::make_index_sequence<Lanes<T>::W>{}));
  }
}

// The unnormalized Walsh-Hadamard transform of n = 2^k values in place (natural order: v <- H v with H Sylvester's
// +-1 matrix).
template <typename T>
inline void fwht(T* v, int64_t n) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  if (n < W) {
    for (int64_t h = 1; h < n; h *= 2)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const T a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
    return;
  }
  for (int64_t j = 0; j < n; j += W) store(v + j, stages_in_vector<T>(load<V>(v + j)));
  for (int64_t h = W; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; j += W) {
        const V a = load<V>(v + j), c = load<V>(v + j + h);
        store(v + j, a + c);
        store(v + j + h, a - c);
      }
}

// The vectors a segment may span and still be transformed in registers: half the register file (AVX-512 and NEON
// have 32 vector registers, AVX2 and SSE2 16), the rest for the butterflies' temporaries.
#if VMQ_VEC_BYTES == 64 || defined(__aarch64__)
constexpr int kRegisterVectors = 16;
#else
constexpr int kRegisterVectors = 8;
#endif

// fwht() on N = NV * W values held in NV vectors: the same butterflies in the same order (so the same sums, bit for
// bit), with the loops' bounds known at compile time, so that the segment is loaded once, stays in registers and is
// stored once.
template <typename T, int NV>
inline void fwht_vectors(typename Lanes<T>::V* v) {
  for (int j = 0; j < NV; ++j) v[j] = stages_in_vector<T>(v[j]);
  for (int h = 1; h < NV; h *= 2)
    for (int i = 0; i < NV; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const typename Lanes<T>::V a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
}

// out[r] = scale * H x[r] for each row of length NV * W (scale folds H's normalization, or nothing when 1).
template <typename T, int NV>
inline void fwht_rows(const T* x, int64_t begin, int64_t end, int64_t stride_in, int64_t stride_out, T scale,
                      T* out) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  for (int64_t r = begin; r < end; ++r) {
    V v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load<V>(x + r * stride_in + j * W);
    fwht_vectors<T, NV>(v);
    for (int j = 0; j < NV; ++j) store(out + r * stride_out + j * W, scale == T(1) ? v[j] : v[j] * scale);
  }
}

// Whether b is a power of two (the sizes the transform takes).
inline bool power_of_two(int64_t b) { return b > 0 && (b & (b - 1)) == 0; }

template <typename T>
using RowsKernel = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, T, T*);

// fwht_rows<T, NV> for segments of b = NV * W values where this ISA keeps NV vectors in registers; null otherwise.
template <typename T>
inline RowsKernel<T> in_registers(int64_t b) {
  constexpr int W = Lanes<T>::W;
  if (b % W) return nullptr;
  switch (b / W) {
    case 1: return &fwht_rows<T, 1>;
    case 2: return &fwht_rows<T, 2>;
    case 4: return &fwht_rows<T, 4>;
    case 8: return &fwht_rows<T, 8>;
    case 16:
      if constexpr (kRegisterVectors >= 16) return &fwht_rows<T, 16>;
      return nullptr;
    default: return nullptr;
  }
}

// out[r, :] = x[r, :] @ kron(odd, H_b) for rows r in [begin, end) of d = m * b values each (rows contiguous);
// odd [m, m] row-major, or null for m = 1; work: d values of scratch (unused when m = 1).
template <typename T>
void transform_rows(const T* x, int64_t begin, int64_t end, int64_t d, const T* odd, int64_t m, T* out, T* work) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t b = d / m;
  const T norm = static_cast<T>(1.0 / std::sqrt(static_cast<double>(b)));
  const RowsKernel<T> segments = in_registers<T>(b);
  if (m == 1 && segments) {  // one load and one store per value
    segments(x, begin, end, d, d, norm, out);
    return;
  }
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * d;
    T* yr = out + r * d;
    T* buf = m == 1 ? yr : work;
    if (segments) {
      for (int64_t i = 0; i < m; ++i) segments(xr + i * b, 0, 1, d, d, T(1), buf + i * b);
    } else {
      std::memcpy(buf, xr, static_cast<size_t>(d) * sizeof(T));
      for (int64_t i = 0; i < m; ++i) fwht(buf + i * b, b);
    }
    if (m == 1) {
      int64_t j = 0;
      for (; j + W <= d; j += W) store(yr + j, load<V>(yr + j) * norm);
      for (; j < d; ++j) yr[j] *= norm;
      continue;
    }
    // y[p, :] = sum_i odd[i, p] X[i, :] (odd^T X), the normalization in the coefficient
    for (int64_t p = 0; p < m; ++p) {
      T* yp = yr + p * b;
      int64_t j = 0;
      for (; j + W <= b; j += W) {
        V acc = V{};
        for (int64_t i = 0; i < m; ++i) acc += (odd[i * m + p] * norm) * load<V>(buf + i * b + j);
        store(yp + j, acc);
      }
      for (; j < b; ++j) {
        T acc = 0;
        for (int64_t i = 0; i < m; ++i) acc += (odd[i * m + p] * norm) * buf[i * b + j];
        yp[j] = acc;
      }
    }
  }
}

}  // namespace vmq_fx::hadamard
