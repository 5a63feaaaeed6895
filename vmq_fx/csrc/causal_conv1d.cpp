// CPU kernel of vmq::causal_conv1d: depthwise (anti-)causal convolution + optional SiLU on [batch, L, channels].
//
// One pass: a task owns W channels (the SIMD lanes) of one batch element and walks the sequence with the taps and the
// last K inputs in registers, applying the SiLU before the one store (at::parallel_for over batch x channel blocks).
#include <torch/extension.h>

#include "kernels.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

namespace {

using namespace vmq_fx;

// One block of W channels of one batch element, K known at compile time: the taps and the last K input vectors stay
// in registers while t walks the sequence, so every input and output vector is touched once.
template <typename T, int K>
void conv_block(const T* x, int64_t st, int64_t length, const T* taps, int64_t channels, const T* bias, int lanes,
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

template <typename T>
void conv_rows(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& bias, bool silu, bool reverse,
               at::Tensor& out) {
  constexpr int W = Lanes<T>::W;
  const int64_t batch = x.size(0), length = x.size(1), channels = x.size(2), kernel = taps.size(0);
  const int64_t sb = x.stride(0), st = x.stride(1), blocks = (channels + W - 1) / W;
  const T* xp = x.data_ptr<T>();
  const T* wp = taps.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * W;
      const int lanes = static_cast<int>(std::min<int64_t>(W, channels - c0));
      const T* xb = xp + b * sb + c0;
      T* ob = op + b * length * channels + c0;
      const T* bb = bp ? bp + c0 : nullptr;
      auto run = [&](auto k) {
        conv_block<T, decltype(k)::value>(xb, st, length, wp + c0, channels, bb, lanes, silu, reverse, ob);
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
  });
}

}  // namespace

namespace vmq_fx {

at::Tensor causal_conv1d_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool silu, bool reverse) {
  TORCH_CHECK_VALUE(x_in.dim() == 3, "vmq.causal_conv1d: x must be [batch, L, channels], got shape ", x_in.sizes());
  const int64_t channels = x_in.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == channels, "vmq.causal_conv1d: weight must be [channels=",
                    channels, ", K], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == channels),
                    "vmq.causal_conv1d: bias must be [channels=", channels, "], got shape ",
                    bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(weight.size(1) >= 1 && weight.size(1) <= 8,
                    "vmq.causal_conv1d: the CPU kernel handles widths 1 to 8 (Mamba uses 4), got ", weight.size(1));
  const auto cdt = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = x_in.to(cdt);
  if (x.stride(2) != 1) x = x.contiguous();
  const at::Tensor taps = weight.to(cdt).t().contiguous();  // [K, channels]
  const at::Tensor b = bias ? bias->to(cdt).contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (cdt == at::kDouble)
    conv_rows<double>(x, taps, b, silu, reverse, out);
  else
    conv_rows<float>(x, taps, b, silu, reverse, out);
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

static void register_causal_conv1d(torch::Library& cpu, torch::Library&) {
  cpu.impl("causal_conv1d", TORCH_FN(causal_conv1d_cpu));
}
VMQ_FX_CPU_KERNELS(register_causal_conv1d);

}  // namespace vmq_fx
