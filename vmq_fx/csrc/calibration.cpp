// Calibration statistics of the per-token static activation quantizer, for 197-token models and hundreds of images.
//
// token_stats: per-token min / max and per-channel max |x| of a [batch, L, C] activation, in one pass (torch needs
// three, plus a transposing copy). histogram_add: grows the per-token histograms' ranges to hold the values
// (RowHistograms' doubling, which took longer in torch ops than the counting) and counts them. histogram_search: the Lp
// range search of PTQ4VM over a histogram, each non-empty bin standing for its values at its center: the candidate
// ranges and the quantization arithmetic of vmq_fx.pt2e.observers.lp_search.search_asymmetric_ranges, with |e|^p from
// vexp2 / vlog2 (relative error ~1e-6).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace vmq_fx {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_stats(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 3, "vmq.token_stats: x must be [batch, L, channels], got ", x_in.sizes());
  const at::Tensor x = x_in.to(at::kFloat);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t sb = x.stride(0), st = x.stride(1), sc = x.stride(2);
  auto tmin = at::empty({L}, x.options()), tmax = at::empty({L}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L));
  auto partial = at::zeros({chunks, C}, x.options());  // channel max |x| of each chunk of tokens
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* cmax = partial.data_ptr<float>() + chunk * C;
      for (int64_t t = chunk * L / chunks; t < (chunk + 1) * L / chunks; ++t) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (int64_t b = 0; b < B; ++b) {
          const float* row = xp + b * sb + t * st;
          for (int64_t c = 0; c < C; ++c) {
            const float v = row[c * sc];
            lo = std::min(lo, v);
            hi = std::max(hi, v);
            cmax[c] = std::max(cmax[c], std::fabs(v));
          }
        }
        tmin.data_ptr<float>()[t] = lo;
        tmax.data_ptr<float>()[t] = hi;
      }
    }
  });
  return {tmin, tmax, std::get<0>(partial.max(0))};
}

// Doubles the bin width of one row until [lo, hi] fits: pairs of bins merge, and the old range becomes the upper half
// of the new one when values fall below it (the lower half otherwise). RowHistograms._grow, row by row.
static void grow_row(float* h, float& start, float& width, int64_t bins, float lo, float hi) {
  const int64_t half = bins / 2;
  while (true) {
    const bool left = lo < start, right = hi >= start + width * static_cast<float>(bins);
    if (!left && !right) return;
    if (left) {
      for (int64_t j = half - 1; j >= 0; --j) h[half + j] = h[2 * j] + h[2 * j + 1];
      std::fill(h, h + half, 0.0f);
      start = start - width * static_cast<float>(bins);
    } else {
      for (int64_t j = 0; j < half; ++j) h[j] = h[2 * j] + h[2 * j + 1];
      std::fill(h + half, h + bins, 0.0f);
    }
    width = width * 2;
  }
}

void histogram_add(const at::Tensor& x_in, at::Tensor& counts, at::Tensor& start, at::Tensor& width,
                   const at::Tensor& lo_in, const at::Tensor& hi_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 3, "vmq.histogram_add: x must be [batch, L, channels], got ", x_in.sizes());
  const int64_t L = x_in.size(1);
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == L && counts.size(1) % 2 == 0 && start.dim() == 1 &&
                        start.size(0) == L && width.dim() == 1 && width.size(0) == L,
                    "vmq.histogram_add: counts must be [L=", L, ", bins] (bins even), start and width [L], got ",
                    counts.sizes(), ", ", start.sizes(), ", ", width.sizes());
  // Grown and counted in place, through raw pointers: the C++ kernel needs them as RowHistograms keeps them.
  TORCH_CHECK_VALUE(counts.is_contiguous() && start.is_contiguous() && width.is_contiguous() &&
                        counts.scalar_type() == at::kFloat && start.scalar_type() == at::kFloat &&
                        width.scalar_type() == at::kFloat,
                    "vmq.histogram_add: the C++ kernel needs contiguous float32 counts, start and width");
  const at::Tensor x = x_in.to(at::kFloat);
  const at::Tensor lo = lo_in.to(at::kFloat).contiguous(), hi = hi_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), C = x.size(2), bins = counts.size(1);
  const int64_t sb = x.stride(0), st = x.stride(1), sc = x.stride(2);
  const float* xp = x.data_ptr<float>();
  float *s = start.data_ptr<float>(), *w = width.data_ptr<float>();
  at::parallel_for(0, L, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* h = counts.data_ptr<float>() + t * bins;
      grow_row(h, s[t], w[t], bins, lo.data_ptr<float>()[t], hi.data_ptr<float>()[t]);
      const float origin = s[t], inv = 1.0f / w[t];
      for (int64_t b = 0; b < B; ++b) {
        const float* row = xp + b * sb + t * st;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = static_cast<int64_t>(std::floor((row[c * sc] - origin) * inv));
          h[std::min(std::max<int64_t>(i, 0), bins - 1)] += 1.0f;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> histogram_search(const at::Tensor& counts_in, const at::Tensor& start_in,
                                      const at::Tensor& width_in, const at::Tensor& lo_in, const at::Tensor& hi_in,
                                      int64_t levels, double p, int64_t num_candidates) {
  using V = Lanes<float>::V;
  constexpr int W = Lanes<float>::W;
  const at::Tensor counts = counts_in.to(at::kFloat).contiguous();
  const at::Tensor start = start_in.to(at::kFloat).contiguous(), width = width_in.to(at::kFloat).contiguous();
  const at::Tensor lo = lo_in.to(at::kFloat).contiguous(), hi = hi_in.to(at::kFloat).contiguous();
  const int64_t R = counts.size(0), bins = counts.size(1);
  auto best_lo = lo.clone(), best_hi = hi.clone();
  const float qmax = static_cast<float>(levels - 1), pf = static_cast<float>(p);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> xs, ws;
    for (int64_t r = r0; r < r1; ++r) {
      xs.clear();
      ws.clear();
      const float* h = counts.data_ptr<float>() + r * bins;
      const float origin = start.data_ptr<float>()[r], bw = width.data_ptr<float>()[r];
      for (int64_t i = 0; i < bins; ++i)
        if (h[i] > 0) {
          xs.push_back(origin + bw * (static_cast<float>(i) + 0.5f));
          ws.push_back(h[i]);
        }
      while (xs.size() % W) {  // pad to whole vectors with weight 0
        xs.push_back(0.0f);
        ws.push_back(0.0f);
      }
      const float l = lo.data_ptr<float>()[r], u = hi.data_ptr<float>()[r];
      const float mid = (l + u) / 2, half = (u - l) / 2;
      double best = std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < num_candidates; ++i) {
        const float shrink = static_cast<float>(1.0 - static_cast<double>(i) / num_candidates);
        const float c_lo = mid - half * shrink, c_hi = mid + half * shrink;
        const float scale = std::max((c_hi - c_lo) / qmax, 1e-8f);
        const float zp = std::nearbyint(-c_lo / scale);
        V acc = V{};
        for (size_t k = 0; k < xs.size(); k += W) {
          const V x = load<V>(&xs[k]);
          // round half to even: adding 1.5 * 2^23 rounds; larger values are clamped below either way
          V q = ((x / scale + 12582912.0f) - 12582912.0f) + zp;
          q = q < V{} ? V{} : q;
          q = q > qmax ? V{} + qmax : q;
          acc += load<V>(&ws[k]) * vpow_abs(x - (q - zp) * scale, pf);
        }
        double err = 0;
        for (int j = 0; j < W; ++j) err += acc[j];
        if (err < best) {
          best = err;
          best_lo.data_ptr<float>()[r] = c_lo;
          best_hi.data_ptr<float>()[r] = c_hi;
        }
      }
    }
  });
  return {best_lo, best_hi};
}

static void register_calibration(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("token_stats", TORCH_FN(token_stats));
  cpu.impl("histogram_add", TORCH_FN(histogram_add));
  cpu.impl("histogram_search", TORCH_FN(histogram_search));
  for (const char* op : {"token_stats", "histogram_add", "histogram_search"})
    autograd_cpu.impl(op, torch::CppFunction::makeFromBoxedFunction<&backward_in_python>());
}
VMQ_FX_CPU_KERNELS(register_calibration);

}  // namespace vmq_fx
