// CPU paths of vmq::int8_linear and vmq::vq_linear.
//
// int8_linear: one pass quantizes the activation per token (x / smooth * (1 / scale), round half to even, + zero
// point, clamp, - shift into int8), at::_int_mm multiplies with int32 accumulation (oneDNN / VNNI), and one pass
// rescales: (acc - (zp - shift) * colsum(W)) * act_scale[t] * w_scale[n] + bias[n]. The column sums come from the
// lowering (they depend on the weight only). The levels and the float operations are those of the pure-torch path, in
// the same order, so both give bit-identical results.
//
// vq_linear: the codes are decoded (bit-packed indices -> codewords * row scale) straight into a float32 panel of
// rows that is multiplied at once; no integer unpacking tensor is materialized.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

at::Tensor quantize_per_token(const at::Tensor& x2, const c10::optional<at::Tensor>& smooth,
                              const at::Tensor& act_scale, const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                              int64_t shift) {
  const int64_t M = x2.size(0), K = x2.size(1), L = act_scale.size(0);
  auto out = at::empty({M, K}, x2.options().dtype(at::kChar));
  const float* xp = x2.data_ptr<float>();
  const float* sp = smooth ? smooth->data_ptr<float>() : nullptr;
  const float* scale = act_scale.data_ptr<float>();
  const int32_t* zp = zero_point.data_ptr<int32_t>();
  int8_t* op = out.data_ptr<int8_t>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), sh = static_cast<float>(shift);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t t = m % L;
      const float inv = 1.0f / scale[t];  // as quantize_per_channel: x * (1 / scale)
      const float z = static_cast<float>(zp[t]);
      const float* row = xp + m * K;
      int8_t* q = op + m * K;
      if (sp) {
        for (int64_t k = 0; k < K; ++k) {
          float v = std::nearbyint((row[k] / sp[k]) * inv) + z;
          q[k] = static_cast<int8_t>(std::min(std::max(v, lo), hi) - sh);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          float v = std::nearbyint(row[k] * inv) + z;
          q[k] = static_cast<int8_t>(std::min(std::max(v, lo), hi) - sh);
        }
      }
    }
  });
  return out;
}

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

at::Tensor int8_linear(const at::Tensor& x, const c10::optional<at::Tensor>& smooth, const at::Tensor& act_scale,
                       const at::Tensor& zero_point, const at::Tensor& w, const at::Tensor& w_sum,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t qmin, int64_t qmax) {
  const int64_t K = x.size(-1), L = act_scale.size(0);
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  const int64_t shift = qmax > 127 ? 128 : 0;  // unsigned levels are moved into int8
  const at::Tensor w8 = w.scalar_type() == at::kChar ? w : unpack_int4(w, K);
  const int64_t N = w8.size(0);
  const at::Tensor xq = quantize_per_token(x2, smooth, act_scale, zero_point, qmin, qmax, shift);
  // at::_int_mm needs more than 16 rows; tiny inputs take the exact int32 product instead.
  const at::Tensor acc = M > 16 ? at::_int_mm(xq, w8.t()) : at::matmul(xq.to(at::kInt), w8.t().to(at::kInt));
  auto out = at::empty({M, N}, x2.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const int32_t* zp = zero_point.data_ptr<int32_t>();
  const int32_t* ws = w_sum.data_ptr<int32_t>();
  const float* as = act_scale.data_ptr<float>();
  const float* wsc = w_scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t t = m % L;
      const int32_t z = zp[t] - static_cast<int32_t>(shift);
      const float s = as[t];
      const int32_t* a = ap + m * N;
      float* o = op + m * N;
      if (bp) {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n] - z * ws[n]) * s * wsc[n] + bp[n];
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<float>(a[n] - z * ws[n]) * s * wsc[n];
      }
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}

// Rows [r0, r1) of the VQ weight, decoded into dst [r1 - r0, K] (row-major float32).
void vq_decode_rows(const uint8_t* codes, int64_t bytes_per_row, const float* codebook, int64_t d,
                    const float* row_scale, int64_t K, int64_t bits, int64_t r0, int64_t r1, float* dst) {
  const int64_t per_row = (K + d - 1) / d;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* c = codes + r * bytes_per_row;
    const float s = row_scale[r];
    float* o = dst + (r - r0) * K;
    for (int64_t j = 0; j < per_row; ++j) {
      uint32_t idx;
      if (bits == 8) {
        idx = c[j];
      } else {
        const int64_t pos = j * bits, byte = pos >> 3;
        uint32_t window = 0;  // up to 3 bytes hold a code of at most 16 bits that starts anywhere in a byte
        for (int64_t q = 0; q < 3 && byte + q < bytes_per_row; ++q) window |= uint32_t(c[byte + q]) << (8 * q);
        idx = (window >> (pos & 7)) & mask;
      }
      const float* cw = codebook + idx * d;
      const int64_t k0 = j * d, n = std::min(d, K - k0);
      for (int64_t q = 0; q < n; ++q) o[k0 + q] = cw[q] * s;
    }
  }
}

at::Tensor vq_dequantize(const at::Tensor& codes, const at::Tensor& codebook, const at::Tensor& row_scale, int64_t K,
                         int64_t bits) {
  const int64_t N = codes.size(0);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous(), rs = row_scale.to(at::kFloat).contiguous();
  auto w = at::empty({N, K}, cb.options());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    vq_decode_rows(codes.data_ptr<uint8_t>(), codes.size(1), cb.data_ptr<float>(), cb.size(1), rs.data_ptr<float>(),
                   K, bits, begin, end, w.data_ptr<float>() + begin * K);
  });
  return w;
}

at::Tensor vq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                     const at::Tensor& row_scale, const c10::optional<at::Tensor>& bias, int64_t K, int64_t bits) {
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor w = vq_dequantize(codes, codebook, row_scale, K, bits);
  at::Tensor out = bias ? at::addmm(bias->to(at::kFloat), x2, w.t()) : at::mm(x2, w.t());
  auto sizes = x.sizes().vec();
  sizes.back() = codes.size(0);
  return out.view(sizes);
}

}  // namespace

void register_quant_linear(pybind11::module& m) {
  m.def("int8_linear", &int8_linear, "per-token quantize + int8 GEMM + rescale");
  m.def("quantize_per_token", &quantize_per_token, "per-token static quantization to int8 (levels - shift)");
  m.def("vq_dequantize", &vq_dequantize, "decode a VQ weight to float32 [N, K]");
  m.def("vq_linear", &vq_linear, "x @ decode(codes)^T + bias");
}
