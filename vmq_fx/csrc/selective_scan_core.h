// The fused CPU selective scan's core (vmq_fx/csrc/selective_scan.cpp describes the algorithm): plain pointers,
// strides and GCC / Clang vector extensions (vec.h), no torch. The torch op (selective_scan.cpp) and the onnxruntime
// op (ort/selective_scan_op.cpp) are thin wrappers around it, each with its own thread pool.
#pragma once

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace vmq_fx {
namespace scan {

// The rows of one block's lanes, one row per time step: step t at p + t * step.
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t step = 0;
  const T* at(int64_t t) const { return p + t * step; }
};

// A [batch, channels, L] array viewed through its strides.
template <typename T>
struct Strided3 {
  const T* p = nullptr;
  int64_t sb = 0, sc = 0, st = 0;
  Strided3() = default;
  // reverse: time step t of the view is step length - 1 - t of the array.
  Strided3(const T* base, int64_t sb_, int64_t sc_, int64_t st_, int64_t length, bool reverse)
      : p(base + (reverse ? (length - 1) * st_ : 0)), sb(sb_), sc(sc_), st(reverse ? -st_ : st_) {}
  // rows [c0, c0 + n) of batch b -> buf[t * W + lane]; lanes past n are zero.
  template <int W>
  void pack(int64_t b, int64_t c0, int n, int64_t length, T* buf) const {
    if (n < W) std::fill(buf, buf + length * W, T(0));
    const T* base = p + b * sb + c0 * sc;
    if (sc == 1) {  // channels contiguous (a transposed [batch, L, channels] tensor): one row of lanes per step
      for (int64_t t = 0; t < length; ++t) std::memcpy(buf + t * W, base + t * st, n * sizeof(T));
      return;
    }
    for (int c = 0; c < n; ++c) {
      const T* row = base + c * sc;
      for (int64_t t = 0; t < length; ++t) buf[t * W + c] = row[t * st];
    }
  }
  // The rows of channels [c0, c0 + n) of batch b: read in place where they are a full register of contiguous
  // channels (Vim's sequence-major tensors), else packed into buf. A copy pass costs about as much as the loads it
  // feeds (the forward spent 22 % of its time packing u, delta and z and copying the output out).
  template <int W>
  Rows<T> rows(int64_t b, int64_t c0, int n, int64_t length, T* buf) const {
    if (sc == 1 && n == W) return {p + b * sb + c0, st};
    pack<W>(b, c0, n, length, buf);
    return {buf, W};
  }
};

// B or C [batch, G, N, L] through its strides (a stride of 0 over G: one array shared by the groups).
template <typename T>
struct StridedBC {
  const T* p = nullptr;
  int64_t sb = 0, sg = 0, sn = 0, st = 0;
  // (b, g) -> buf[t * N + n] (t counted from the end when reverse).
  void pack(int64_t b, int64_t g, int64_t n_state, int64_t length, bool reverse, T* buf) const {
    const T* q = p + b * sb + g * sg + (reverse ? (length - 1) * st : 0);
    const int64_t step = reverse ? -st : st;
    for (int64_t n = 0; n < n_state; ++n)
      for (int64_t t = 0; t < length; ++t) buf[t * n_state + n] = q[n * sn + t * step];
  }
  // The N states of each step of (b, g): read in place where they are contiguous (Vim's B and C are slices of x_proj's
  // sequence-major output; an exported file's are Split outputs), else packed into buf.
  Rows<T> rows(int64_t b, int64_t g, int64_t n_state, int64_t length, bool reverse, T* buf) const {
    if (sn == 1) return {p + b * sb + g * sg + (reverse ? (length - 1) * st : 0), reverse ? -st : st};
    pack(b, g, n_state, length, reverse, buf);
    return {buf, n_state};
  }
};

template <typename T, int W>
void unpack(const T* buf, int n, int64_t length, bool reverse, T* dst, int64_t sc) {
  // dst is a contiguous [*, channels, L] row block: row c at dst + c * sc.
  for (int c = 0; c < n; ++c) {
    T* row = dst + c * sc;
    if (reverse)
      for (int64_t t = 0; t < length; ++t) row[length - 1 - t] = buf[t * W + c];
    else
      for (int64_t t = 0; t < length; ++t) row[t] = buf[t * W + c];
  }
}

struct Shapes {
  int64_t batch, dim, length, n_state, groups, per_group, blocks_per_group;

  // Channels split into groups (of B and C), each group into blocks of one register's lanes of T.
  template <typename T>
  static Shapes of(int64_t batch, int64_t dim, int64_t length, int64_t n_state, int64_t groups) {
    constexpr int W = Lanes<T>::W;
    return {batch, dim, length, n_state, groups, dim / groups, (dim / groups + W - 1) / W};
  }
};

// One block of channels; NS: the state size when known at compile time (NS = 0: any). The state is an array that
// every step loads and stores (from L1): GCC 12 keeps it in memory even with the loop over the states unrolled (read
// in its assembly, AVX-512 build; also with a larger SRA size limit), and those loads and stores do not compete with
// the vector arithmetic. The loop is unrolled all the same: the same bits, and at Vim-T shapes, batch 8, in the harness
// of vec.h's Exp2Range (AMD EPYC Zen 4, medians of six alternating p10s) the AVX-512 build 2.35 -> 2.28 ms (faster in
// 6 of 6 pairs), AVX2 3.60 -> 3.51 ms (4 of 6).
// Range: what the block's dt * A guarantee (vdecay's kRange).
template <typename T, int NS, Exp2Range Range = Exp2Range::kAny>
struct Block {
  using V = typename Lanes<T>::V;
  static constexpr int W = Lanes<T>::W;

  int64_t length, n;
  const T* dt;       // [L][W]
  Rows<T> u;         // rows of W lanes (in place where the input allows)
  Rows<T> bt, ct;    // rows of N states
  const V* a;        // [N] lanes of A * decay_scale<T>()
  // Rows to fetch into cache while the recurrence runs (the next run's inputs): line i of step t at pf[i] + t * pf_step.
  const T* const* pf = nullptr;
  int npf = 0;
  int64_t pf_step = 0;

  // Forward; y[t] (before D and the gate) and the final state. With `decay` / `hs` non-null the per-step decays
  // and states are kept for the backward ([L][N] vectors each).
  void forward(T* y, V* h_last, V* decay, V* hs) const {
    const int64_t N = NS ? NS : n;
    V h[NS ? NS : 1];
    std::vector<V> h_dyn(NS ? 0 : N);
    V* hp = NS ? h : h_dyn.data();
    for (int64_t i = 0; i < N; ++i) hp[i] = V{};
    for (int64_t t = 0; t < length; ++t) {
      for (int i = 0; i < npf; ++i) __builtin_prefetch(pf[i] + t * pf_step);
      const V d = load<V>(dt + t * W);
      const V du = d * load<V>(u.at(t));
      const T* b = bt.at(t);
      const T* c = ct.at(t);
      V acc = V{};
#pragma GCC unroll 16
      for (int64_t i = 0; i < N; ++i) {
        const V e = vdecay<Range>(d * a[i]);
        hp[i] = e * hp[i] + du * b[i];
        acc += hp[i] * c[i];
        if (decay) {
          decay[t * N + i] = e;
          hs[t * N + i] = hp[i];
        }
      }
      store(y + t * W, acc);
    }
    for (int64_t i = 0; i < N; ++i) h_last[i] = hp[i];
  }
};

template <typename T, typename F>
void dispatch_state(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// delta (+ delta_bias, softplus) for lanes of channels [c0, c0 + lanes): raw values in buf -> dt in place; with
// `sig` non-null also sigmoid(raw) (the derivative of softplus) for the backward.
template <typename T>
void discretize(T* buf, const T* bias, int64_t c0, int lanes, int64_t length, bool softplus, T* sig) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  V bv = V{};
  if (bias)
    for (int c = 0; c < lanes; ++c) bv[c] = bias[c0 + c];
  for (int64_t t = 0; t < length; ++t) {
    const V raw = load<V>(buf + t * W) + bv;
    if (sig) store(sig + t * W, vsigmoid(raw));
    store(buf + t * W, softplus ? vsoftplus(raw) : raw);
  }
}

// The forward of one call, on plain pointers and strides: what the torch op (selective_scan.cpp) and the
// onnxruntime op (ort/selective_scan_op.cpp) share. Tasks are (batch, group, channel block); run(begin, end) does
// tasks [begin, end) with its thread's buffers, so any parallel-for can split them.
template <typename T>
struct VMQ_BUILD_LOCAL ScanForward {
  using V = typename Lanes<T>::V;
  static constexpr int W = Lanes<T>::W;

  Shapes s;
  Strided3<T> u, delta, z;  // z.p null: no gate
  Strided3<T> add;          // added to the output (Vim's other direction); p null: none
  StridedBC<T> B, C;
  const T* A;                // [dim, N], contiguous
  const T* D;                // [dim] or null
  const T* delta_bias;       // [dim] or null
  bool softplus, reverse;
  T* out_rows;               // [batch, L, dim], contiguous (sequence-major)
  T* last;                   // [batch, dim, N], contiguous

  int64_t tasks() const { return s.batch * s.groups * s.blocks_per_group; }

  // Tasks [begin, end) go in runs of consecutive blocks of one (batch, group), as many as keep a run's buffers near
  // 64 KB each: the elementwise work before and after the recurrence (delta's bias and softplus, the gate, the output)
  // walks the run's channels time step by time step, so that sequence-major tensors stream through memory in row
  // order, and the recurrence then runs block by block. One block at a time, those passes touched one 64-byte piece of
  // each 1.5 KB row per step (Vim-T): 1.15x slower in a standalone harness of this core (AVX-512 build; 1.07x AVX2,
  // 1.02x generic). Runs of 2 blocks were slower still, and of 20 no faster than one (this Xeon's 2 MB L2).
  void run(int64_t begin, int64_t end) const {
    const int64_t L = s.length, N = s.n_state, nb = s.blocks_per_group;
    const int64_t run_blocks = std::max<int64_t>(1, (int64_t{64} << 10) / (L * W * int64_t(sizeof(T))));
    const bool gated = z.p != nullptr;
    // Buffers kept per thread across calls (a few hundred KB at most: a run's blocks are sized to ~64 KB each): a call
    // split into many chunks (onnxruntime's threads take 64 whatever their number) allocated and zeroed its own each
    // time.
    const bool adds = add.p != nullptr;
    thread_local std::vector<T> ubuf, dbuf, ybuf, zbuf, abuf, bbuf, cbuf;
    thread_local std::vector<V> a, h, bias, dv, dmax;
    thread_local std::vector<int> lanes;
    thread_local std::vector<Rows<T>> ur, dr, zr, ar;
    bbuf.resize(L * N), cbuf.resize(L * N), a.resize(N), h.resize(N);
    Rows<T> br, cr;
    for (int64_t first = begin; first < end;) {
      const int64_t bg = first / nb, nk = std::min({end, (bg + 1) * nb, first + run_blocks}) - first;
      const int64_t b = bg / s.groups, g = bg % s.groups, c_first = g * s.per_group + (first % nb) * W;
      if (first == begin || first % nb == 0) {
        br = B.rows(b, g, N, L, reverse, bbuf.data());
        cr = C.rows(b, g, N, L, reverse, cbuf.data());
      }
      for (auto* buf : {&ubuf, &dbuf, &ybuf}) buf->resize(nk * L * W);
      if (gated) zbuf.resize(nk * L * W);
      if (adds) abuf.resize(nk * L * W);
      lanes.resize(nk), ur.resize(nk), dr.resize(nk), zr.resize(nk), ar.resize(nk), bias.resize(nk), dv.resize(nk),
          dmax.resize(nk);
      const auto slot = [&](std::vector<T>& buf, int64_t k) { return buf.data() + k * L * W; };
      for (int64_t k = 0; k < nk; ++k) {
        const int64_t c0 = c_first + k * W;
        lanes[k] = static_cast<int>(std::min<int64_t>(W, (g + 1) * s.per_group - c0));
        ur[k] = u.template rows<W>(b, c0, lanes[k], L, slot(ubuf, k));
        dr[k] = delta.template rows<W>(b, c0, lanes[k], L, slot(dbuf, k));
        if (gated) zr[k] = z.template rows<W>(b, c0, lanes[k], L, slot(zbuf, k));
        if (adds) ar[k] = add.template rows<W>(b, c0, lanes[k], L, slot(abuf, k));
        bias[k] = dv[k] = dmax[k] = V{};
        for (int c = 0; c < lanes[k]; ++c) {
          if (delta_bias) bias[k][c] = delta_bias[c0 + c];
          if (D) dv[k][c] = D[c0 + c];
        }
      }
      // dt = delta + bias (softplus) into dbuf, row by row across the run (a packed block is converted in place), and
      // where 2^x clamps, each block's largest dt (vmax keeps dmax where dt is NaN: NaN decays either way)
      for (int64_t t = 0; t < L; ++t)
        for (int64_t k = 0; k < nk; ++k) {
          const V raw = load<V>(dr[k].at(t)) + bias[k];
          const V d = softplus ? vsoftplus(raw) : raw;
          store(slot(dbuf, k) + t * W, d);
          if (kExp2Clamps && softplus) dmax[k] = vmax(d, dmax[k]);
        }
      // The next run's sequence-major rows of delta, u and z (one 64-byte line per block and step with AVX-512) are
      // fetched during this run's recurrence, which is compute-bound, instead of stalling the elementwise passes
      // around the next one: rows 1.5 KB apart cross a 4 KB page every few steps, where the hardware prefetchers stop.
      // Vim-T forward at batch 8, one thread (Intel Xeon with AMX): 1.81-1.90 -> 1.67-1.74 ms (AVX-512 build), 4.80 ->
      // 4.72 ms (AVX2); batch 1 0.23-0.24 -> 0.22 ms. Fetching the output rows for writing as well gained nothing.
      const int64_t next = first + nk;
      int64_t next_c = -1, next_b = 0, next_nk = 0;
      if (next < end && u.sc == 1 && delta.sc == 1 && (!gated || z.sc == 1) && u.st == delta.st &&
          (!gated || z.st == delta.st)) {
        const int64_t nbg = next / nb;
        next_b = nbg / s.groups;
        next_c = (nbg % s.groups) * s.per_group + (next % nb) * W;
        next_nk = std::min({end, (nbg + 1) * nb, next + run_blocks}) - next;
      }
      for (int64_t k = 0; k < nk; ++k) {
        const int64_t c0 = c_first + k * W;
        const T* pf[3];
        int npf = 0;
        if (next_c >= 0 && k < next_nk) {
          const int64_t c = next_c + k * W;
          pf[npf++] = delta.p + next_b * delta.sb + c;
          pf[npf++] = u.p + next_b * u.sb + c;
          if (gated) pf[npf++] = z.p + next_b * z.sb + c;
        }
        // softplus makes dt >= 0; with A <= 0 (Mamba's A = -exp(A_log)) every decay's argument is <= 0, and at least
        // -126 (2^x needs no clamp) where the largest dt times the most negative A is: float products are monotonic.
        bool nonpositive = softplus;
        V amin = V{};
        for (int64_t i = 0; i < N; ++i) {
          V v = V{};
          for (int c = 0; c < lanes[k]; ++c) {
            v[c] = A[(c0 + c) * N + i];
            nonpositive = nonpositive && v[c] <= T(0);
          }
          a[i] = v * decay_scale<T>();
          amin = vmin(amin, a[i]);
        }
        bool normal = kExp2Clamps && nonpositive;
        for (int c = 0; c < lanes[k] && normal; ++c) normal = dmax[k][c] * amin[c] >= T(-126);
        dispatch_state<T>(N, [&](auto ns) {
          const auto run_block = [&](auto range) {
            Block<T, decltype(ns)::value, decltype(range)::value> blk{L,  N,   slot(dbuf, k), ur[k], br, cr,
                                                                    a.data(), pf, npf, delta.st};
            blk.forward(slot(ybuf, k), h.data(), nullptr, nullptr);
          };
          using R = Exp2Range;
          if (normal)
            run_block(std::integral_constant<R, R::kNormal>{});
          else if (nonpositive)
            run_block(std::integral_constant<R, R::kNonPositive>{});
          else
            run_block(std::integral_constant<R, R::kAny>{});
        });
        for (int c = 0; c < lanes[k]; ++c)
          for (int64_t i = 0; i < N; ++i) last[(b * s.dim + c0 + c) * N + i] = h[i][c];
      }
      // + D u, the gate, + add, into [batch, L, dim]: full blocks straight into the output row, partial ones through
      // ybuf. The gated value is rounded before add joins it (no fused multiply-add): the float sum of an add op.
      T* ob = out_rows + b * L * s.dim + c_first;
      for (int64_t t = 0; t < L; ++t) {
        T* row = ob + (reverse ? L - 1 - t : t) * s.dim;
        for (int64_t k = 0; k < nk; ++k) {
          V y = load<V>(slot(ybuf, k) + t * W) + dv[k] * load<V>(ur[k].at(t));
          if (gated) {
            const V zz = load<V>(zr[k].at(t));
            y = y * zz * vsigmoid(zz);
          }
          if (adds) {
            rounded_here(y);
            y = y + load<V>(ar[k].at(t));
          }
          store(lanes[k] == W ? row + k * W : slot(ybuf, k) + t * W, y);
        }
      }
      for (int64_t k = 0; k < nk; ++k)
        if (lanes[k] < W)
          for (int64_t t = 0; t < L; ++t)
            std::memcpy(ob + (reverse ? L - 1 - t : t) * s.dim + k * W, slot(ybuf, k) + t * W, lanes[k] * sizeof(T));
      first += nk;
    }
  }
};

}  // namespace scan
}  // namespace vmq_fx
