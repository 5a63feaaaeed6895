// SIMD helpers shared by the CPU kernels: vectors of one machine register (GCC / Clang vector extensions) and
// branch-free math on them.
//
// The width follows the instruction set the file is compiled for (vmq_fx/ops/native.py builds the kernels once per
// CPU class and picks one at run time, as ATen does with CPU_CAPABILITY):
//   AVX-512: 64-byte vectors (16 floats), AVX2 + FMA: 32 bytes (8 floats), generic x86-64 (SSE2) and ARM64 NEON:
//   16 bytes (4 floats).
// One register per vector matters for the scan: 64-byte vectors in the AVX2 build (two registers each) ran it 4.2x
// slower (README, "CPU speed").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VMQ_VEC_BYTES 64
#elif defined(__AVX2__)
#define VMQ_VEC_BYTES 32
#else
#define VMQ_VEC_BYTES 16
#endif

// The instruction set of this build, as vmq_fx/ops/native.py names it (reported by the module for the tests).
#if defined(__AVX512F__)
#define VMQ_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define VMQ_ISA_NAME "avx2"
#elif defined(__aarch64__)
#define VMQ_ISA_NAME "neon"
#else
#define VMQ_ISA_NAME "generic"
#endif

// For code with static or thread_local state in headers (inline functions, class templates): hidden from the dynamic
// linker. With default visibility GCC makes each such variable one process-wide object (STB_GNU_UNIQUE), shared by
// every loaded build (avx512, avx2, generic: separate libraries in one process, with vectors of different widths)
// and by the onnxruntime library.
#define VMQ_BUILD_LOCAL __attribute__((visibility("hidden")))

namespace vmq_fx {

constexpr int kVecBytes = VMQ_VEC_BYTES;

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int W = kVecBytes / 4;
  typedef float V __attribute__((vector_size(VMQ_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(VMQ_VEC_BYTES)));
};
template <>
struct Lanes<double> {
  static constexpr int W = kVecBytes / 8;
  typedef double V __attribute__((vector_size(VMQ_VEC_BYTES)));
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// lo > x ? lo : x and hi < x ? hi : x, lane by lane (x where x is NaN, the clamps' semantics): one vmaxps / vminps on
// x86, whose NaN rule (the second operand) gives exactly that; the vector extensions' ternary compiles to a compare
// and a blend. With these in the exp, sigmoid and softplus (and the exponent taken from the rounding sum's bits), the
// Vim-T scan forward at batch 8 in a standalone harness of its core, one thread on an AMD EPYC Zen 3 (AVX2 only), went
// from 6.5-6.7 to 5.6-5.8 ms (AVX2 build; 10th percentiles of 200 runs) and 20.6 to 16.1 ms (generic build), with
// bit-identical outputs.
inline Lanes<float>::V vmax(Lanes<float>::V lo, Lanes<float>::V x) {
  using V = Lanes<float>::V;
#if defined(__AVX512F__)
  return (V)_mm512_max_ps((__m512)lo, (__m512)x);
#elif defined(__AVX2__)
  return (V)_mm256_max_ps((__m256)lo, (__m256)x);
#elif defined(__x86_64__)
  return (V)_mm_max_ps((__m128)lo, (__m128)x);
#else
  return lo > x ? lo : x;
#endif
}

inline Lanes<float>::V vmin(Lanes<float>::V hi, Lanes<float>::V x) {
  using V = Lanes<float>::V;
#if defined(__AVX512F__)
  return (V)_mm512_min_ps((__m512)hi, (__m512)x);
#elif defined(__AVX2__)
  return (V)_mm256_min_ps((__m256)hi, (__m256)x);
#elif defined(__x86_64__)
  return (V)_mm_min_ps((__m128)hi, (__m128)x);
#else
  return hi < x ? hi : x;
#endif
}

inline Lanes<double>::V vmax(Lanes<double>::V lo, Lanes<double>::V x) { return lo > x ? lo : x; }
inline Lanes<double>::V vmin(Lanes<double>::V hi, Lanes<double>::V x) { return hi < x ? hi : x; }

// c[0] + c[1] f + ... + c[n - 1] f^(n - 1) by Horner's scheme (one FMA per coefficient after the first).
template <int n>
inline Lanes<float>::V horner(Lanes<float>::V f, const float (&c)[n]) {
  Lanes<float>::V p = Lanes<float>::V{} + c[n - 1];
  for (int i = n - 2; i >= 0; --i) p = p * f + c[i];
  return p;
}

// Keeps v as computed here, rounded to float: the compiler cannot fuse the operation that produced it into a later
// add (FMA contraction), which changes the later results' rounding.
template <typename V>
inline void rounded_here(V& v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// 2^y for a vector of floats: y = k + f with k an integer, a polynomial for 2^f, scaled by 2^k. The
// recurrence's decay exp(dt * A) is computed as 2^(dt * (A log2 e)) with A pre-scaled once per block: one multiply
// fewer per state update.
//   AVX-512: f = y - floor(y) in [0, 1) in one instruction (vreduceps) and vscalefps multiplies by 2^floor(y) itself
//   (saturating to 0 and inf): 12 % faster than rounding to nearest, then subtracting, for the scan (its exp is most of
//   a state update's work).
//   Other builds: k = y rounded to the nearest integer (clamped to the float exponent range), f in [-1/2, 1/2], k
//   added into the exponent bits.
// The AVX-512 polynomial is a degree-5 minimax fit of 2^f on [0, 1] (Lawson's iteration on the relative error; 7.5e-8
// in exact arithmetic, 1.6e-7 evaluated in float32 with FMAs, about one float spacing at 1): one FMA fewer than the
// degree-6 fit it replaced (2e-9 exact, 8e-8 in float32) made the scan's forward 2-9 % faster (Vim-T shapes, batch
// 8, one thread, Intel Xeon with AVX-512 VNNI, a standalone C++ micro-benchmark of the scan core, not kept: the 10th
// percentile of 101 calls 2.25 -> 2.06 ms on a quiet host, faster in 7 of 8 alternating pairs on a noisy one), and the
// scan's tests against float64 references hold their tolerances (1e-5 relative). The other builds' polynomial is a
// degree-5 minimax fit on [-1/2, 1/2] with 2^0 = 1 kept exact (9e-8 exact, 1.7e-7 in float32 with FMAs; the degree-6
// Chebyshev fit it replaced: 9e-8 in float32), 6-7 % faster for the AVX2 build's scan in the same micro-benchmark
// (the least of six 10th percentiles, alternating processes, noisy host: 4.89 -> 4.57 ms); the SSE2 build, without
// FMAs, rounds twice per step.
// Range: what the caller guarantees of y (or y is NaN), so that the builds that clamp y skip the clamps it makes
// redundant (the same result, a vector operation fewer each):
//   kNonPositive: y <= 0, no upper clamp. The scan, where softplus and A <= 0 guarantee it: 7 % faster in the AVX2
//   build (the harness above, Intel Xeon: the least p10 of six alternating runs 4.25 -> 3.95 ms, faster in 5 of 6).
//   kNormal: -126 <= y <= 0, no clamp at all (2^y is a normal float; below it the exponent add would wrap). The scan
//   proves it per channel block from the block's largest dt and most negative A (selective_scan_core.h). The same
//   bits; the scan's forward at Vim-T shapes, batch 8 (random inputs: delta ~ N(-2, 1), A from -1 to -17, every block
//   in range), AMD EPYC Zen 4, a standalone harness of ScanForward (not kept), medians of six alternating p10s: AVX2
//   build 3.52 -> 3.37 ms, generic (SSE2) 11.44 -> 11.15 ms, each faster in 6 of 6 pairs.
enum class Exp2Range { kAny, kNonPositive, kNormal };

// Whether this build's 2^x clamps its argument (all but AVX-512, whose vscalefps saturates), i.e. whether a caller
// gains by proving Exp2Range::kNormal.
#if defined(__AVX512F__)
constexpr bool kExp2Clamps = false;
#else
constexpr bool kExp2Clamps = true;
#endif

template <Exp2Range kRange = Exp2Range::kAny>
inline Lanes<float>::V vexp2(Lanes<float>::V y) {
  using V = Lanes<float>::V;
#if defined(__AVX512F__)
  const V f = (V)_mm512_reduce_ps((__m512)y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const V p = horner(f, {9.9999994e-1f, 6.9315308e-1f, 2.4015361e-1f, 5.5826329e-2f, 8.9893388e-3f, 1.8775743e-3f});
  return (V)_mm512_scalef_ps((__m512)p, (__m512)y);
#else
  using I = Lanes<float>::I;
  if (kRange != Exp2Range::kNormal) y = vmax(V{} - 126.0f, y);
  else rounded_here(y);  // without a clamp the compiler would fuse the caller's dt * A into y + 1.5 * 2^23 (an FMA)
  if (kRange == Exp2Range::kAny) y = vmin(V{} + 127.0f, y);
  const V r = y + 12582912.0f;  // + 1.5 * 2^23 rounds to the nearest integer k: r's bits are 0x4B400000 + k
  const V f = y - (r - 12582912.0f);
  const V p = horner(f, {1.0f, 6.9314700e-1f, 2.4022242e-1f, 5.5507336e-2f, 9.6715074e-3f, 1.3264711e-3f});
  // k added into p's exponent field as an integer: << 23 shifts k there and 0x4B400000 out. p * 2^k exactly, as the
  // multiply by a float 2^k built from k + 127 that it replaced gave it, one vector operation fewer. The same bits for
  // every finite y: the result stays normal, because p is in [2^-1/2, 2^1/2] and p >= 1 whenever k = -126 (then
  // f >= 0); compared on every 7th float in [-300, 300] (6.5e8 of them). The AVX2 build's scan 6-7 % faster (the
  // harness of the 2^x comment above, p10 4.52 -> 4.24 ms in five alternating pairs, a quiet host). A NaN y stays a
  // NaN unless its payload has bits in the low 9 (not what arithmetic produces).
  return (V)((I)p + ((I)r << 23));
#endif
}

constexpr float kLog2e = 1.44269504088896341f;

inline Lanes<float>::V vexp(Lanes<float>::V x) { return vexp2(x * kLog2e); }

// The decay exp(dt * A) from dt and A pre-scaled by decay_scale<T>(): 2^x for floats, exp for doubles (kRange: what
// the caller guarantees of x, as vexp2).
template <Exp2Range kRange = Exp2Range::kAny>
inline Lanes<float>::V vdecay(Lanes<float>::V x) {
  return vexp2<kRange>(x);
}

// Doubles (used to check the kernel against float64 references): the library exp per lane.
inline Lanes<double>::V vexp(Lanes<double>::V x) {
  Lanes<double>::V out;
  for (int i = 0; i < Lanes<double>::W; ++i) out[i] = std::exp(x[i]);
  return out;
}

template <Exp2Range kRange = Exp2Range::kAny>
inline Lanes<double>::V vdecay(Lanes<double>::V x) {
  return vexp(x);
}

template <typename T>
constexpr T decay_scale() {
  return sizeof(T) == 4 ? T(kLog2e) : T(1);
}

// 1 / x for a vector of floats: with AVX-512 the 14-bit estimate (vrcp14ps) refined by one Newton step (~1e-8 relative
// error, below float rounding) instead of a division, whose throughput limits the elementwise kernels.
inline Lanes<float>::V vrecip(Lanes<float>::V x) {
#if defined(__AVX512F__)
  const Lanes<float>::V r = (Lanes<float>::V)_mm512_rcp14_ps((__m512)x);
  return r * (2.0f - x * r);
#else
  return 1.0f / x;
#endif
}

inline Lanes<double>::V vrecip(Lanes<double>::V x) { return 1.0 / x; }

template <typename V>
inline V vsigmoid(V x) {
  // exp(-x) capped at exp(80) so that the reciprocal's Newton step never sees inf (inf * 0); sigmoid(-80) ~ 2e-35
  return vrecip(1 + vexp(vmin(V{} + 80, -x)));
}

// softplus as torch computes it (x above 20 passes through), for a vector of floats: max(x, 0) + log1p(exp(-|x|)), with
// log1p(y) = 2 atanh(s), s = y / (2 + y) in [0, 1/3] (no cancellation for tiny y), by the odd series of atanh to s^13
// (truncation ~1e-8 relative), written in t = 2s. One quotient, through vrecip: the two divisions of the form it
// replaced (log on [1, 2] and a log1p correction) were a third of the scan's discretization (AVX-512; 0.43 -> 0.34 ns
// an element, AVX2 1.18 -> 0.83, the same error against log1p(exp(x)) in double).
// Every operation stays on normal floats, whose subnormal operands cost microcode assists (2.5x the time of a sweep
// that reaches x = -104): below x = -87, where exp(x) is subnormal, the result is 0 (torch: at most 1.7e-38), and t^2
// below 1e-12, which adds nothing to the series, is not formed.
inline Lanes<float>::V vsoftplus(Lanes<float>::V x) {
  using V = Lanes<float>::V;
  const V zero = V{}, lowest = V{} + 87.0f;
  using I = Lanes<float>::I;
  const V ax = vmin(lowest, (V)((I)x & 0x7fffffff));
  const V y = vexp(-ax);
  const V t = (y + y) * vrecip(y + 2.0f);  // 2 s, in [0, 2/3]
  const V tt = t > 1e-6f ? t : zero;
  // sum_k s^(2k) / (2k + 1) = sum_k t^(2k) / ((2k + 1) 4^k)
  const V p = horner(tt * tt, {1.0f, 1.0f / 12, 1.0f / 80, 1.0f / 448, 1.0f / 2304, 1.0f / 11264, 1.0f / 53248});
  const V sp = vmax(zero, x) + t * p;
  return x > 20.0f ? x : (x < -lowest ? zero : sp);
}

inline Lanes<double>::V vsoftplus(Lanes<double>::V x) {
  Lanes<double>::V out;
  for (int i = 0; i < Lanes<double>::W; ++i) out[i] = x[i] > 20.0 ? x[i] : std::log1p(std::exp(x[i]));
  return out;
}


// log2 of positive floats: exponent + a polynomial of the mantissa in [sqrt(1/2), sqrt(2)) (atanh series, ~1e-7).
// Zero and subnormal inputs give a large negative number (the callers raise it to a positive power).
inline Lanes<float>::V vlog2(Lanes<float>::V x) {
  using V = Lanes<float>::V;
  using I = Lanes<float>::I;
  x = x < V{} + 1e-30f ? V{} + 1e-30f : x;
  I bits = (I)x;
  I e = ((bits >> 23) & 0xff) - 127;
  V m = (V)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const V big = m > 1.41421356f ? V{} + 1.0f : V{};
  m = m * (1.0f - 0.5f * big);
  const V ef = __builtin_convertvector(e, V) + big;
  const V s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  V poly = s2 * (1.0f / 9) + 1.0f / 7;
  poly = poly * s2 + 1.0f / 5;
  poly = poly * s2 + 1.0f / 3;
  poly = poly * s2 + 1.0f;
  return ef + (2.0f * 1.44269504088896341f) * s * poly;
}

// |x|^p for p > 0 (0 for x = 0).
inline Lanes<float>::V vpow_abs(Lanes<float>::V x, float p) {
  using V = Lanes<float>::V;
  const V a = x < V{} ? -x : x;
  const V r = vexp2(p * vlog2(a));
  return a == V{} ? V{} : r;
}

}  // namespace vmq_fx
