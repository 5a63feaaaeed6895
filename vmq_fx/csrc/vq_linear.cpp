// CPU paths of vmq::vq_linear and vmq::vq_dequantize (vmq_fx/ops/vq_linear.py defines the ops): the codes are
// decoded (bit-packed indices -> codewords * row scale) straight into a float32 weight that the fp32 GEMM multiplies;
// no integer unpacking tensor is materialized. vq_linear decodes a weight once and keeps the float32 weight while its
// codes live (the default: the product is then the FP32 model's GEMM, no slower), or decodes per call into scratch
// memory (set_vq_decode_once(false): the codes alone stay in memory, at 0.83-0.93x of the fp32 linear at Vim-T shapes,
// batch 1, where the decode costs up to a sixth of the product).

#include "kernels.h"
#include "linear_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

using namespace vmq_fx::linear;

// emit(j, code) for each of the per_row codes of one row, a little-endian bitstream of `bits`-bit codes. Whole bytes
// (8 bits), 6 bits (four codes in three bytes: 3-bit VQ's d = 2, k = 64) and 4 bits (two in a byte) unpack without a
// window per code, which was most of a 6-bit decode: Vim-T's in_proj weight took 0.62 ns a weight, 0.38 now (8-bit
// codes: 0.21, 0.16 now with one vector of d floats per code).
template <typename Emit>
void for_each_code(const uint8_t* c, int64_t bytes, int64_t per_row, int64_t bits, Emit&& emit) {
  int64_t j = 0;
  if (bits == 8) {
    for (; j < per_row; ++j) emit(j, c[j]);
  } else if (bits == 6) {
    for (; j + 4 <= per_row; j += 4) {
      const uint8_t* p = c + j / 4 * 3;
      const uint32_t v = p[0] | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16;
      emit(j, v & 63);
      emit(j + 1, (v >> 6) & 63);
      emit(j + 2, (v >> 12) & 63);
      emit(j + 3, v >> 18);
    }
  } else if (bits == 4) {
    for (; j + 2 <= per_row; j += 2) {
      emit(j, c[j / 2] & 15);
      emit(j + 1, c[j / 2] >> 4);
    }
  }
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  for (; j < per_row; ++j) {  // other widths, and the codes after the last whole group
    const int64_t pos = j * bits, byte = pos >> 3;
    uint64_t window = 0;  // a code of at most 16 bits starting anywhere in a byte lies in the next 8 bytes
    if (byte + 8 <= bytes) {
      std::memcpy(&window, c + byte, 8);
    } else {
      for (int64_t q = 0; byte + q < bytes; ++q) window |= uint64_t(c[byte + q]) << (8 * q);
    }
    emit(j, static_cast<uint32_t>((window >> (pos & 7)) & mask));
  }
}

// Rows [r0, r1) of the VQ weight, decoded into dst [r1 - r0, K] (row-major float32). D > 0: the sub-vector length
// known at compile time (one vector load and store per code); D = 0: any length d.
template <int D>
void decode_rows(const uint8_t* codes, int64_t bytes, const float* codebook, int64_t d, const float* row_scale,
                 int64_t K, int64_t bits, int64_t r0, int64_t r1, float* dst) {
  const int64_t dd = D ? D : d, per_row = (K + dd - 1) / dd, full = K / dd;
  for (int64_t r = r0; r < r1; ++r) {
    const float s = row_scale[r];
    float* o = dst + (r - r0) * K;
    // always inlined: a call per code costs more than the code's decode
    const auto emit = [&](int64_t j, uint32_t code) __attribute__((always_inline)) {
      const float* cw = codebook + code * dd;
      float* oj = o + j * dd;
      if constexpr (D == 2 || D == 4 || D == 8) {
        if (j < full) {  // one vector of D floats
          typedef float VD __attribute__((vector_size(D * sizeof(float))));
          VD v;
          std::memcpy(&v, cw, sizeof(v));
          v *= s;
          std::memcpy(oj, &v, sizeof(v));
          return;
        }
      }
      // the zero-padded tail of the last sub-vector is not part of the weight
      for (int64_t q = 0; q < dd && j * dd + q < K; ++q) oj[q] = cw[q] * s;
    };
    for_each_code(codes + r * bytes, bytes, per_row, bits, emit);
  }
}

void vq_decode_rows(const uint8_t* codes, int64_t bytes, const float* codebook, int64_t d, const float* row_scale,
                    int64_t K, int64_t bits, int64_t r0, int64_t r1, float* dst) {
  switch (d) {
    case 1: return decode_rows<1>(codes, bytes, codebook, d, row_scale, K, bits, r0, r1, dst);
    case 2: return decode_rows<2>(codes, bytes, codebook, d, row_scale, K, bits, r0, r1, dst);
    case 4: return decode_rows<4>(codes, bytes, codebook, d, row_scale, K, bits, r0, r1, dst);
    case 8: return decode_rows<8>(codes, bytes, codebook, d, row_scale, K, bits, r0, r1, dst);
    default: return decode_rows<0>(codes, bytes, codebook, d, row_scale, K, bits, r0, r1, dst);
  }
}

int64_t code_bits(int64_t k) {
  int64_t bits = 1;
  while ((int64_t(1) << bits) < k) ++bits;
  return bits;
}

// The contract of the VQ ops, with the messages of the Python implementation (ValueError in Python).
void check_vq(const at::Tensor& codes, const at::Tensor& codebook, const at::Tensor& row_scale, int64_t K) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vmq.vq_linear: codebook must be [k, d], got ", codebook.sizes());
  const int64_t k = codebook.size(0), d = codebook.size(1), bits = code_bits(k), per_row = (K + d - 1) / d;
  const int64_t bytes = (per_row * bits + 7) / 8;
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.size(1) == bytes,
                    "vmq.vq_linear: codes must be uint8 [N, ", bytes, "] for K=", K, ", d=", d, ", k=", k, "; got ",
                    vmq_fx::dtype_name(codes), " ", codes.sizes());
  TORCH_CHECK_VALUE(row_scale.dim() == 1 && row_scale.size(0) == codes.size(0) && row_scale.scalar_type() == at::kByte,
                    "vmq.vq_linear: row_scale must be uint8 [N=", codes.size(0), "] (encode_row_scale), got ",
                    vmq_fx::dtype_name(row_scale), " ", row_scale.sizes());
}

// 2^(c / 16 - 12) for every 8-bit row-scale code, computed once as vmq_fx.ops.vq_linear._row_scales is (so
// both decode alike): per call, three ATen ops on the row scales cost more than the decode at batch 1.
const float* row_scale_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t;
    const at::Tensor v = at::exp2(at::arange(256, at::kFloat) * (1.0 / 16) + (-12.0)).contiguous();
    std::memcpy(t.data(), v.data_ptr<float>(), sizeof(t));
    return t;
  }();
  return table.data();
}

std::atomic<bool> g_decode_once{true};

at::Tensor decode(const at::Tensor& codes_in, const at::Tensor& codebook, const at::Tensor& row_scale_in, int64_t K,
                  bool temporary) {
  const at::Tensor codes = codes_in.contiguous(), row_scale = row_scale_in.contiguous();
  const int64_t N = codes.size(0), bits = code_bits(codebook.size(0)), d = codebook.size(1);
  // The codebook is stored in float16: widened here (k * d values) rather than by a separate ATen op per call.
  std::vector<float> cb(codebook.numel());
  if (codebook.scalar_type() == at::kHalf && codebook.is_contiguous()) {
    const c10::Half* h = codebook.data_ptr<c10::Half>();
    for (size_t i = 0; i < cb.size(); ++i) cb[i] = static_cast<float>(h[i]);
  } else {
    const at::Tensor f = codebook.to(at::kFloat).contiguous();
    std::memcpy(cb.data(), f.data_ptr<float>(), cb.size() * sizeof(float));
  }
  std::vector<float> rs(N);
  const uint8_t* rc = row_scale.data_ptr<uint8_t>();
  const float* table = row_scale_table();
  for (int64_t n = 0; n < N; ++n) rs[n] = table[rc[n]];
  auto w = temporary ? scratch(1, {N, K}, at::kFloat) : at::empty({N, K}, codes.options().dtype(at::kFloat));
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    vq_decode_rows(codes.data_ptr<uint8_t>(), codes.size(1), cb.data(), d, rs.data(), K, bits, begin, end,
                   w.data_ptr<float>() + begin * K);
  });
  return w;
}

}  // namespace

namespace vmq_fx {

at::Tensor vq_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebook, const at::Tensor& row_scale,
                             int64_t in_features) {
  check_vq(codes, codebook, row_scale, in_features);
  return decode(codes, codebook, row_scale, in_features, /*temporary=*/false);
}

at::Tensor vq_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                         const at::Tensor& row_scale, const std::optional<at::Tensor>& bias, int64_t in_features) {
  check_vq(codes, codebook, row_scale, in_features);
  TORCH_CHECK_VALUE(x.size(-1) == in_features, "vmq.vq_linear: x has ", x.size(-1), " features, the weight ",
                    in_features);
  // not made contiguous: at::mm takes a row- or column-major x as it is (a transposed scan output, a split's slice)
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_features});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  at::Tensor w;
  if (g_decode_once.load()) {
    w = linear::cached_derived<linear::kVqWeight, 3>({&codes, &codebook, &row_scale}, [&] {
      return std::vector<at::Tensor>{decode(codes, codebook, row_scale, in_features, /*temporary=*/false)};
    })[0];
  }
  if (!w.defined() || w.size(1) != in_features)  // (the same codes read with another in_features: not cached)
    w = decode(codes, codebook, row_scale, in_features, /*temporary=*/true);
  at::Tensor out = bias ? at::addmm(f32(*bias), x2, w.t()) : at::mm(x2, w.t());
  auto sizes = x.sizes().vec();
  sizes.back() = codes.size(0);
  out = out.view(sizes);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

void set_vq_decode_once(bool once) { g_decode_once.store(once); }

bool vq_decode_once() { return g_decode_once.load(); }

// No backward: the AutogradCPU kernels refuse inputs that require grad and skip the Python autograd layer.
static void register_vq_linear(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("vq_linear", TORCH_FN(vq_linear_cpu));
  cpu.impl("vq_dequantize", TORCH_FN(vq_dequantize_cpu));
  for (const char* op : {"vq_linear", "vq_dequantize"})
    autograd_cpu.impl(op, torch::CppFunction::makeFromBoxedFunction<&no_backward>());
}
VMQ_FX_CPU_KERNELS(register_vq_linear);

}  // namespace vmq_fx
