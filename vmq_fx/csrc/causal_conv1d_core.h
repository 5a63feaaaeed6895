// The depthwise (anti-)causal convolution + optional SiLU of vmq::causal_conv1d on [batch, L, channels], on plain
// pointers: the core the torch op (causal_conv1d.cpp) and the onnxruntime op (ort/causal_conv1d_op.cpp) share. No
// torch.
//
// A task owns a run of rows (time steps) of one batch element and computes every channel of a row before the next
// row, so the input and the output stream through memory in order, and applies the SiLU before the one store. The
// K - 1 inputs before a row are read again from memory (cache-resident: the rows just read).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace vmq_fx::conv {

// Each row's input is fetched into cache this many rows ahead of its use: the rows are a strided half of in_proj's
// output (3 KB apart in Vim-T, 1.5 KB of each read), which the hardware prefetchers do not follow across pages. Vim-T's
// two directions at batch 8, one thread (Intel Xeon, freed memory reused): 0.58-0.60 -> 0.45-0.46 ms (AVX-512 build),
// 0.99-1.01 -> 0.91-0.99 ms (AVX2); batch 1 unchanged; 2 and 8 rows ahead measured the same as 4.
constexpr int64_t kPrefetchRows = 4;

// Rows [t0, t1) of one batch element, K known at compile time. Causal: y[t] = sum_k w[k] x[t - (K-1) + k];
// anti-causal (reverse): y[t] = sum_k w[k] x[t + (K-1) - k]; inputs outside [0, L) are zeros (their terms skipped).
// A channel's products are summed in the order of k, after the bias, in every lane.
template <typename T, int K>
inline void conv_rows(const T* x, int64_t st, int64_t t0, int64_t t1, int64_t length, const T* taps, int64_t channels,
                      const T* bias, bool silu, bool reverse, T* out) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t full = channels / W * W;
  const int tail = static_cast<int>(channels - full);
  for (int64_t t = t0; t < t1; ++t) {
    const T* src[K];
    bool inside[K];
    for (int k = 0; k < K; ++k) {
      const int64_t s = reverse ? t + (K - 1) - k : t - (K - 1) + k;
      inside[k] = s >= 0 && s < length;
      src[k] = x + (inside[k] ? s : 0) * st;
    }
    T* o = out + t * channels;
    const int64_t ahead = (reverse ? t + (K - 1) : t) + kPrefetchRows;
    const T* next = ahead < length ? x + ahead * st : nullptr;
    for (int64_t c = 0; c < full; c += W) {
      if (next) __builtin_prefetch(next + c);
      V acc = bias ? load<V>(bias + c) : V{};
      for (int k = 0; k < K; ++k)
        if (inside[k]) acc += load<V>(taps + k * channels + c) * load<V>(src[k] + c);
      if (silu) acc = acc * vsigmoid(acc);
      store(o + c, acc);
    }
    if (tail) {  // the last channels, in the lanes of one vector
      V acc = V{};
      for (int c = 0; c < tail; ++c) acc[c] = bias ? bias[full + c] : T(0);
      for (int k = 0; k < K; ++k) {
        if (!inside[k]) continue;
        V w = V{}, v = V{};
        for (int c = 0; c < tail; ++c) {
          w[c] = taps[k * channels + full + c];
          v[c] = src[k][full + c];
        }
        acc += w * v;
      }
      if (silu) acc = acc * vsigmoid(acc);
      for (int c = 0; c < tail; ++c) o[full + c] = acc[c];
    }
  }
}

// The kernel widths the core handles (Mamba's is 4).
constexpr int64_t kMaxWidth = 8;

// Rows per task: enough to amortize re-reading the K - 1 rows before a task's first, few enough that a batch-1 call
// still splits across threads.
constexpr int64_t kRowsPerTask = 16;

// The number of tasks of conv_task: batch x ceil(length / kRowsPerTask).
inline int64_t conv_tasks(int64_t batch, int64_t length) {
  return batch * ((length + kRowsPerTask - 1) / kRowsPerTask);
}

// Task `task` of conv_tasks(batch, length): x [batch, L, channels] with strides (sb, st, 1); taps [K, channels]
// contiguous; bias [channels] or null; out [batch, L, channels] contiguous.
template <typename T>
void conv_task(int64_t task, const T* x, int64_t sb, int64_t st, int64_t length, int64_t channels, const T* taps,
               int64_t kernel, const T* bias, bool silu, bool reverse, T* out) {
  const int64_t chunks = (length + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t b = task / chunks, t0 = (task % chunks) * kRowsPerTask, t1 = std::min(t0 + kRowsPerTask, length);
  const T* xb = x + b * sb;
  T* ob = out + b * length * channels;
  auto run = [&](auto k) {
    conv_rows<T, decltype(k)::value>(xb, st, t0, t1, length, taps, channels, bias, silu, reverse, ob);
  };
  switch (kernel) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{});
  }
}

}  // namespace vmq_fx::conv
