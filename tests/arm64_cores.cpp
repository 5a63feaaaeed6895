// Runs the torch-free kernel cores (vmq_fx/csrc/*_core.h: the code the torch ops and the onnxruntime ops share) on raw
// float32 / int32 files, for tests/test_arm64.py: cross-compiled for ARM64 and run under qemu-user, so that their
// NEON paths run, not only compile. No torch: there is no ARM64 libtorch here to link against.
//
//   arm64_cores scan DIR batch dim L N groups softplus reverse gated has_D has_bias sequence_major
//   arm64_cores conv DIR batch L channels kernel has_bias silu reverse
//   arm64_cores linear DIR M K N qmin qmax period has_smooth has_bias
//   arm64_cores hadamard DIR rows d m
//   arm64_cores rms_norm DIR rows d
//
// Each reads its inputs from DIR/<name>.bin and writes its outputs to DIR/<name>.bin (shapes in test_arm64.py).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "causal_conv1d_core.h"
#include "hadamard_core.h"
#include "linear_core.h"
#include "rms_norm_core.h"
#include "selective_scan_core.h"

namespace {

std::string g_dir;

template <typename T>
std::vector<T> read(const char* name, int64_t count) {
  const std::string path = g_dir + "/" + name + ".bin";
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "arm64_cores: cannot open %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<T> v(static_cast<size_t>(count));
  const size_t got = std::fread(v.data(), sizeof(T), v.size(), f);
  const bool extra = std::fgetc(f) != EOF;
  std::fclose(f);
  if (got != v.size() || extra) {
    std::fprintf(stderr, "arm64_cores: %s holds other than %lld values\n", path.c_str(), static_cast<long long>(count));
    std::exit(2);
  }
  return v;
}

template <typename T>
void write(const char* name, const std::vector<T>& v) {
  const std::string path = g_dir + "/" + name + ".bin";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "arm64_cores: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

// u, delta, z and add [batch, dim, L] (or [batch, L, dim] when sequence_major), B and C [batch, groups, N, L],
// A [dim, N], D and delta_bias [dim] -> out [batch, L, dim], last [batch, dim, N].
int scan(const std::vector<int64_t>& p) {
  using namespace vmq_fx::scan;
  const int64_t batch = p[0], dim = p[1], L = p[2], N = p[3], groups = p[4];
  const bool softplus = p[5], reverse = p[6], gated = p[7], has_d = p[8], has_bias = p[9], seq = p[10];
  const bool has_add = p[11];
  const auto u = read<float>("u", batch * dim * L), delta = read<float>("delta", batch * dim * L);
  const auto z = gated ? read<float>("z", batch * dim * L) : std::vector<float>();
  const auto B = read<float>("B", batch * groups * N * L), C = read<float>("C", batch * groups * N * L);
  const auto A = read<float>("A", dim * N);
  const auto D = has_d ? read<float>("D", dim) : std::vector<float>();
  const auto bias = has_bias ? read<float>("delta_bias", dim) : std::vector<float>();
  const auto add = has_add ? read<float>("add", batch * dim * L) : std::vector<float>();
  const int64_t sc = seq ? 1 : L, st = seq ? dim : 1;
  auto rows = [&](const std::vector<float>& v) {
    return v.empty() ? Strided3<float>() : Strided3<float>(v.data(), dim * L, sc, st, L, reverse);
  };
  auto states = [&](const std::vector<float>& v) { return StridedBC<float>{v.data(), groups * N * L, N * L, L, 1}; };
  std::vector<float> out(static_cast<size_t>(batch * L * dim)), last(static_cast<size_t>(batch * dim * N));
  const ScanForward<float> fwd{Shapes::of<float>(batch, dim, L, N, groups),
                               rows(u),
                               rows(delta),
                               rows(z),
                               rows(add),
                               states(B),
                               states(C),
                               A.data(),
                               has_d ? D.data() : nullptr,
                               has_bias ? bias.data() : nullptr,
                               softplus,
                               reverse,
                               out.data(),
                               last.data()};
  // in two calls, as two threads would split the tasks
  fwd.run(0, fwd.tasks() / 2);
  fwd.run(fwd.tasks() / 2, fwd.tasks());
  write("out", out);
  write("last", last);
  return 0;
}

// x [batch, L, channels], taps [kernel, channels], bias [channels] -> out [batch, L, channels].
int conv(const std::vector<int64_t>& p) {
  const int64_t batch = p[0], L = p[1], channels = p[2], kernel = p[3];
  const bool has_bias = p[4], silu = p[5], reverse = p[6];
  const auto x = read<float>("x", batch * L * channels), taps = read<float>("taps", kernel * channels);
  const auto bias = has_bias ? read<float>("bias", channels) : std::vector<float>();
  std::vector<float> out(static_cast<size_t>(batch * L * channels));
  for (int64_t task = 0; task < vmq_fx::conv::conv_tasks(batch, L); ++task)
    vmq_fx::conv::conv_task(task, x.data(), L * channels, channels, L, channels, taps.data(), kernel,
                            has_bias ? bias.data() : nullptr, silu, reverse, out.data());
  write("out", out);
  return 0;
}

// x [M, K], smooth [K], act_scale / act_zero_point [period] (row m: token m % period), w [N, K] int32 levels, w_scale
// [N], bias [N] -> levels [M, K] int32 (quantize_row) and out [M, N] (direct_rows: levels x w in float FMAs).
int linear(const std::vector<int64_t>& p) {
  namespace lin = vmq_fx::linear;
  const int64_t M = p[0], K = p[1], N = p[2], qmin = p[3], qmax = p[4], period = p[5];
  const bool has_smooth = p[6], has_bias = p[7];
  const auto x = read<float>("x", M * K);
  const auto smooth = has_smooth ? read<float>("smooth", K) : std::vector<float>();
  const auto scale = read<float>("act_scale", period);
  const auto zero_point = read<int32_t>("act_zero_point", period);
  const auto w = read<int32_t>("w", N * K);
  const auto w_scale = read<float>("w_scale", N);
  const auto bias = has_bias ? read<float>("bias", N) : std::vector<float>();
  const float* s = has_smooth ? smooth.data() : nullptr;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  std::vector<uint8_t> q(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    lin::quantize_row(x.data() + m * K, s, 1.0f / scale[m % period], static_cast<float>(zero_point[m % period]), lo,
                      hi, 0.0f, K, q.data() + m * K);
  write("levels", std::vector<int32_t>(q.begin(), q.end()));
  std::vector<float> wt(static_cast<size_t>(K * lin::direct_padded_cols(N)));
  lin::direct_weight([&](int64_t n, int64_t k) { return static_cast<float>(w[n * K + k]); }, N, K, wt.data());
  std::vector<float> out(static_cast<size_t>(M * N));
  lin::direct_rows(x.data(), s, scale.data(), zero_point.data(), period, lo, hi, K, wt.data(), w_scale.data(),
                   has_bias ? bias.data() : nullptr, N, 0, M, out.data());
  write("out", out);
  return 0;
}

// x [rows, d], odd [m, m] (m > 1) -> out [rows, d] = x @ kron(odd, H_b) / sqrt(b), b = d / m.
int hadamard(const std::vector<int64_t>& p) {
  const int64_t rows = p[0], d = p[1], m = p[2];
  const auto x = read<float>("x", rows * d);
  const auto odd = m > 1 ? read<float>("odd", m * m) : std::vector<float>();
  std::vector<float> out(static_cast<size_t>(rows * d)), work(static_cast<size_t>(d));
  vmq_fx::hadamard::transform_rows(x.data(), 0, rows, d, m > 1 ? odd.data() : nullptr, m, out.data(), work.data());
  write("out", out);
  return 0;
}

// x [rows, d], w [d] -> out [rows, d] = x / sqrt(mean(x^2) + 1e-5) * w.
int rms_norm(const std::vector<int64_t>& p) {
  const int64_t rows = p[0], d = p[1];
  const auto x = read<float>("x", rows * d);
  const auto w = read<float>("w", d);
  std::vector<float> out(static_cast<size_t>(rows * d));
  vmq_fx::norm::rms_norm_rows(x.data(), 0, rows, d, w.data(), 1e-5f, out.data());
  write("out", out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: arm64_cores scan|conv|linear|hadamard|rms_norm DIR PARAMS...\n");
    return 2;
  }
  const std::string op = argv[1];
  g_dir = argv[2];
  std::vector<int64_t> p;
  for (int i = 3; i < argc; ++i) p.push_back(std::strtoll(argv[i], nullptr, 10));
  const size_t want = op == "scan"       ? 12
                      : op == "conv"     ? 7
                      : op == "linear"   ? 8
                      : op == "hadamard" ? 3
                      : op == "rms_norm" ? 2
                                         : 0;
  if (!want || p.size() != want) {
    std::fprintf(stderr, "arm64_cores: unknown op %s or wrong parameter count\n", op.c_str());
    return 2;
  }
  std::printf("%s\n", VMQ_ISA_NAME);
  return op == "scan"       ? scan(p)
         : op == "conv"     ? conv(p)
         : op == "linear"   ? linear(p)
         : op == "hadamard" ? hadamard(p)
                            : rms_norm(p);
}
