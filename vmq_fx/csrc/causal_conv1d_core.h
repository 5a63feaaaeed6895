// The depthwise (anti-)causal convolution + optional SiLU of vmq::causal_conv1d on [batch, L, channels], on plain
// pointers: the core the torch op (causal_conv1d.cpp) and the onnxruntime op (ort/causal_conv1d_op.cpp) share. No
// torch.
//
// A task owns W channels (the SIMD lanes) of one batch element and walks the sequence with the taps and the last K
// inputs in registers, applying the SiLU before the one store.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace vmq_fx::conv {

// One block of W channels of one batch element, K known at compile time: the taps and the last K input vectors stay
// in registers while t walks the sequence, so every input and output vector is touched once.
template <typename T, int K>
inline void conv_block(const T* x, int64_t st, int64_t length, const T* taps, int64_t channels, const T* bias, int lanes,
                bool silu, bool reverse, T* out) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  V w[K], win[K];
  V bv = V{};
  for (int k = 0; k < K; ++k) {
    w[k] = V{};
    win[k] = V{};
    for (int c = 0; c < lanes; ++c) w[k][c] = taps[k * channels + c];
  }
  if (bias)
    for (int c = 0; c < lanes; ++c) bv[c] = bias[c];
  // In reading order (t ascending, or descending when reverse) output i depends on the K last inputs read;
  // win[K - 1] is the newest. Causal: y[t] = sum_k w[k] x[t - (K-1) + k]: the newest input takes w[K - 1].
  // Anti-causal, reading t = L-1 .. 0: y[t] = sum_k w[k] x[t + (K-1) - k]: the newest input (x[t]) takes w[K - 1] too.
  for (int64_t i = 0; i < length; ++i) {
    const int64_t t = reverse ? length - 1 - i : i;
    for (int k = 0; k + 1 < K; ++k) win[k] = win[k + 1];
    if (lanes == W) {
      win[K - 1] = load<V>(x + t * st);
    } else {
      V v = V{};
      for (int c = 0; c < lanes; ++c) v[c] = x[t * st + c];
      win[K - 1] = v;
    }
    V acc = bv;
    for (int k = 0; k < K; ++k) acc += w[k] * win[k];
    if (silu) acc = acc * vsigmoid(acc);
    if (lanes == W) {
      store(out + t * channels, acc);
    } else {
      for (int c = 0; c < lanes; ++c) out[t * channels + c] = acc[c];
    }
  }
}

// The kernel widths the core handles (Mamba's is 4).
constexpr int64_t kMaxWidth = 8;

// Task `task` of batch x ceil(channels / W) tasks: x [batch, L, channels] with strides (sb, st, 1); taps [K, channels];
// bias [channels] or null; out [batch, L, channels] contiguous.
template <typename T>
void conv_task(int64_t task, const T* x, int64_t sb, int64_t st, int64_t length, int64_t channels, const T* taps,
               int64_t kernel, const T* bias, bool silu, bool reverse, T* out) {
  constexpr int W = Lanes<T>::W;
  const int64_t blocks = (channels + W - 1) / W;
  const int64_t b = task / blocks, c0 = (task % blocks) * W;
  const int lanes = static_cast<int>(std::min<int64_t>(W, channels - c0));
  const T* xb = x + b * sb + c0;
  T* ob = out + b * length * channels + c0;
  const T* bb = bias ? bias + c0 : nullptr;
  auto run = [&](auto k) {
    conv_block<T, decltype(k)::value>(xb, st, length, taps + c0, channels, bb, lanes, silu, reverse, ob);
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

// The number of tasks of conv_task.
template <typename T>
int64_t conv_tasks(int64_t batch, int64_t channels) {
  return batch * ((channels + Lanes<T>::W - 1) / Lanes<T>::W);
}

}  // namespace vmq_fx::conv
