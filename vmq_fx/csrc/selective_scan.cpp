// Fused CPU selective scan (forward and backward) for vmq::selective_scan.
//
// One task owns a block of W channels (the SIMD lanes: 16 floats or 8 doubles) of one batch element. Its inputs are
// first copied into time-major [L][W] buffers (whatever the strides of the caller's tensors), then the recurrence runs
// with the state of every lane and every one of the N states held in registers:
//
//     h[n] = exp(dt * A[n]) * h[n] + (dt * u) * B[t, n]        y = sum_n h[n] * C[t, n]  (+ D u, * silu(z))
//
// exp is computed once per (t, channel, n). The backward recomputes the forward of its block, keeping the decays and
// states in a per-task buffer, then runs the recurrence in reverse. The gradients of B and C are sums over the
// channels of a group: a backward task therefore owns all channel blocks of one (batch, group) and accumulates them
// lane-wise before one horizontal reduction, so no two tasks write the same memory.
//
// Parallelism: at::parallel_for over tasks (torch's intra-op thread pool, so torch.set_num_threads applies).
// Portability: GCC / Clang vector extensions; the compiler lowers the 64-byte vectors to the widest SIMD the build
// machine has (the extension is compiled on the machine that runs it).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int W = 16;
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct Lanes<double> {
  static constexpr int W = 8;
  typedef double V __attribute__((vector_size(64)));
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

// exp for 16 floats: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and Cephes' degree-6 polynomial
// (relative error ~1e-7 over the float range); branch-free so that it vectorizes.
inline Lanes<float>::V vexp(Lanes<float>::V x) {
  using V = Lanes<float>::V;
  using I = Lanes<float>::I;
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  V k = (x * 1.44269504088896341f + magic) - magic;
  V r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  I e = (__builtin_convertvector(k, I) + 127) << 23;
  return p * (V)e;
}

// Doubles (used to check the kernel against float64 references): the library exp per lane.
inline Lanes<double>::V vexp(Lanes<double>::V x) {
  Lanes<double>::V out;
  for (int i = 0; i < Lanes<double>::W; ++i) out[i] = std::exp(x[i]);
  return out;
}

template <typename V>
inline V vsigmoid(V x) {
  using T = typename std::remove_reference<decltype(x[0])>::type;
  return T(1) / (T(1) + vexp(-x));
}

// A [batch, channels, L] tensor viewed through its strides.
template <typename T>
struct Strided3 {
  const T* p = nullptr;
  int64_t sb = 0, sc = 0, st = 0;
  Strided3() = default;
  explicit Strided3(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)), st(t.stride(2)) {}
  // rows [c0, c0 + n) of batch b -> buf[t * W + lane]; lanes past n are zero.
  template <int W>
  void pack(int64_t b, int64_t c0, int n, int64_t length, T* buf) const {
    std::fill(buf, buf + length * W, T(0));
    for (int c = 0; c < n; ++c) {
      const T* row = p + b * sb + (c0 + c) * sc;
      for (int64_t t = 0; t < length; ++t) buf[t * W + c] = row[t * st];
    }
  }
};

// B or C [batch, G, N, L] of (b, g) -> buf[t * N + n].
template <typename T>
void pack_bc(const at::Tensor& x, int64_t b, int64_t g, int64_t n_state, int64_t length, T* buf) {
  const T* p = x.data_ptr<T>() + b * x.stride(0) + g * x.stride(1);
  const int64_t sn = x.stride(2), st = x.stride(3);
  for (int64_t n = 0; n < n_state; ++n)
    for (int64_t t = 0; t < length; ++t) buf[t * n_state + n] = p[n * sn + t * st];
}

template <typename T, int W>
void unpack(const T* buf, int n, int64_t length, T* dst, int64_t sc) {
  // dst is a contiguous [*, channels, L] row block: row c at dst + c * sc.
  for (int c = 0; c < n; ++c)
    for (int64_t t = 0; t < length; ++t) dst[c * sc + t] = buf[t * W + c];
}

struct Shapes {
  int64_t batch, dim, length, n_state, groups, per_group, blocks_per_group;
};

template <typename T>
Shapes shapes_of(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B) {
  constexpr int W = Lanes<T>::W;
  Shapes s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.length = u.size(2);
  s.n_state = A.size(1);
  s.groups = B.size(1);
  s.per_group = s.dim / s.groups;
  s.blocks_per_group = (s.per_group + W - 1) / W;
  return s;
}

// One block of channels: state in registers when the state size NS is known at compile time (NS = 0: any).
template <typename T, int NS>
struct Block {
  using V = typename Lanes<T>::V;
  static constexpr int W = Lanes<T>::W;

  int64_t length, n;
  const T *dt, *u, *bt, *ct;  // [L][W], [L][W], [L][N], [L][N]
  const V* a;                 // [N] lanes of A

  // Forward; y[t] (before D and the gate) and the final state. With `decay` / `hs` non-null the per-step decays
  // and states are kept for the backward ([L][N] vectors each).
  void forward(T* y, V* h_last, V* decay, V* hs) const {
    const int64_t N = NS ? NS : n;
    V h[NS ? NS : 1];
    std::vector<V> h_dyn(NS ? 0 : N);
    V* hp = NS ? h : h_dyn.data();
    for (int64_t i = 0; i < N; ++i) hp[i] = V{};
    for (int64_t t = 0; t < length; ++t) {
      const V d = load<V>(dt + t * W);
      const V du = d * load<V>(u + t * W);
      const T* b = bt + t * N;
      const T* c = ct + t * N;
      V acc = V{};
      for (int64_t i = 0; i < N; ++i) {
        const V e = vexp(d * a[i]);
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

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                     const c10::optional<at::Tensor>& z) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const Shapes s = shapes_of<T>(u, A, B);
  auto out = at::empty({s.batch, s.dim, s.length}, u.options());
  auto last = at::empty({s.batch, s.dim, s.n_state}, u.options());
  const Strided3<T> su(u), sdt(dt);
  const Strided3<T> sz = z ? Strided3<T>(*z) : Strided3<T>();
  const T* Ap = A.data_ptr<T>();
  const T* Dp = D ? D->data_ptr<T>() : nullptr;
  T* outp = out.data_ptr<T>();
  T* lastp = last.data_ptr<T>();
  const int64_t tasks = s.batch * s.groups * s.blocks_per_group;
  const int64_t L = s.length, N = s.n_state;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ubuf(L * W), dbuf(L * W), ybuf(L * W), zbuf(z ? L * W : 0), bbuf(L * N), cbuf(L * N);
    std::vector<V> a(N), h(N);
    int64_t packed_bc = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.groups * s.blocks_per_group);
      const int64_t g = (task / s.blocks_per_group) % s.groups;
      const int64_t c0 = g * s.per_group + (task % s.blocks_per_group) * W;
      const int lanes = static_cast<int>(std::min<int64_t>(W, (g + 1) * s.per_group - c0));
      if (packed_bc != b * s.groups + g) {
        pack_bc(B, b, g, N, L, bbuf.data());
        pack_bc(C, b, g, N, L, cbuf.data());
        packed_bc = b * s.groups + g;
      }
      su.template pack<W>(b, c0, lanes, L, ubuf.data());
      sdt.template pack<W>(b, c0, lanes, L, dbuf.data());
      for (int64_t i = 0; i < N; ++i) {
        V v = V{};
        for (int c = 0; c < lanes; ++c) v[c] = Ap[(c0 + c) * N + i];
        a[i] = v;
      }
      dispatch_state<T>(N, [&](auto ns) {
        Block<T, decltype(ns)::value> blk{L, N, dbuf.data(), ubuf.data(), bbuf.data(), cbuf.data(), a.data()};
        blk.forward(ybuf.data(), h.data(), nullptr, nullptr);
      });
      if (z) sz.template pack<W>(b, c0, lanes, L, zbuf.data());
      V dv = V{};
      if (Dp)
        for (int c = 0; c < lanes; ++c) dv[c] = Dp[c0 + c];
      for (int64_t t = 0; t < L; ++t) {
        V y = load<V>(&ybuf[t * W]) + dv * load<V>(&ubuf[t * W]);
        if (z) {
          const V zz = load<V>(&zbuf[t * W]);
          y = y * zz * vsigmoid(zz);
        }
        store(&ybuf[t * W], y);
      }
      unpack<T, W>(ybuf.data(), lanes, L, outp + (b * s.dim + c0) * L, L);
      for (int c = 0; c < lanes; ++c)
        for (int64_t i = 0; i < N; ++i) lastp[(b * s.dim + c0 + c) * N + i] = h[i][c];
    }
  });
  return {out, last};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                      const c10::optional<at::Tensor>& z, const at::Tensor& gout,
                                      const at::Tensor& glast) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const Shapes s = shapes_of<T>(u, A, B);
  const int64_t L = s.length, N = s.n_state;
  auto opts = u.options();
  auto gu = at::empty({s.batch, s.dim, L}, opts);
  auto gdt = at::empty({s.batch, s.dim, L}, opts);
  auto gz = z ? at::empty({s.batch, s.dim, L}, opts) : at::Tensor();
  auto gA = at::empty({s.batch, s.dim, N}, opts);  // per batch element; summed by the caller
  auto gD = at::empty({s.batch, s.dim}, opts);
  auto gB = at::empty({s.batch, s.groups, L, N}, opts);  // time-major; the caller transposes
  auto gC = at::empty({s.batch, s.groups, L, N}, opts);
  const Strided3<T> su(u), sdt(dt), sg(gout);
  const Strided3<T> sz = z ? Strided3<T>(*z) : Strided3<T>();
  const T* Ap = A.data_ptr<T>();
  const T* Dp = D ? D->data_ptr<T>() : nullptr;
  const T* glp = glast.data_ptr<T>();
  const int64_t gl_sb = glast.stride(0), gl_sc = glast.stride(1), gl_sn = glast.stride(2);
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ubuf(L * W), dbuf(L * W), ybuf(L * W), zbuf(z ? L * W : 0), gbuf(L * W), bbuf(L * N),
        cbuf(L * N), gu_buf(L * W), gdt_buf(L * W), gz_buf(z ? L * W : 0);
    std::vector<V> a(N), h(N), carry(N), gA_acc(N), decay(L * N), hs(L * N), gB_acc(L * N), gC_acc(L * N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.groups, g = task % s.groups;
      pack_bc(B, b, g, N, L, bbuf.data());
      pack_bc(C, b, g, N, L, cbuf.data());
      std::fill(gB_acc.begin(), gB_acc.end(), V{});
      std::fill(gC_acc.begin(), gC_acc.end(), V{});
      for (int64_t blk_i = 0; blk_i < s.blocks_per_group; ++blk_i) {
        const int64_t c0 = g * s.per_group + blk_i * W;
        const int lanes = static_cast<int>(std::min<int64_t>(W, (g + 1) * s.per_group - c0));
        su.template pack<W>(b, c0, lanes, L, ubuf.data());
        sdt.template pack<W>(b, c0, lanes, L, dbuf.data());
        sg.template pack<W>(b, c0, lanes, L, gbuf.data());
        if (z) sz.template pack<W>(b, c0, lanes, L, zbuf.data());
        for (int64_t i = 0; i < N; ++i) {
          V v = V{}, cv = V{};
          for (int c = 0; c < lanes; ++c) {
            v[c] = Ap[(c0 + c) * N + i];
            cv[c] = glp[b * gl_sb + (c0 + c) * gl_sc + i * gl_sn];
          }
          a[i] = v;
          carry[i] = cv;
          gA_acc[i] = V{};
        }
        dispatch_state<T>(N, [&](auto ns) {
          Block<T, decltype(ns)::value> blk{L, N, dbuf.data(), ubuf.data(), bbuf.data(), cbuf.data(), a.data()};
          blk.forward(ybuf.data(), h.data(), decay.data(), hs.data());
        });
        V dv = V{};
        if (Dp)
          for (int c = 0; c < lanes; ++c) dv[c] = Dp[c0 + c];
        V gD_acc = V{};
        for (int64_t t = L - 1; t >= 0; --t) {
          const V uu = load<V>(&ubuf[t * W]);
          const V d = load<V>(&dbuf[t * W]);
          const V du = d * uu;
          V gy = load<V>(&gbuf[t * W]);
          if (z) {
            const V zz = load<V>(&zbuf[t * W]);
            const V sig = vsigmoid(zz);
            const V y = load<V>(&ybuf[t * W]) + dv * uu;  // the output before the gate
            store(&gz_buf[t * W], gy * y * sig * (T(1) + zz * (T(1) - sig)));
            gy = gy * zz * sig;
          }
          gD_acc += gy * uu;
          V g_u = gy * dv;
          V g_du = V{}, g_dt = V{};
          const T* bb = &bbuf[t * N];
          const T* cc = &cbuf[t * N];
          const V* dec = &decay[t * N];
          const V* h_t = &hs[t * N];
          const V* h_prev = t > 0 ? &hs[(t - 1) * N] : nullptr;
          for (int64_t i = 0; i < N; ++i) {
            const V lam = gy * cc[i] + carry[i];  // d loss / d h_t
            gC_acc[t * N + i] += gy * h_t[i];
            gB_acc[t * N + i] += lam * du;
            g_du += lam * bb[i];
            carry[i] = dec[i] * lam;  // d loss / d h_{t-1} through the decay
            if (h_prev) {
              const V ge = carry[i] * h_prev[i];  // d loss / d (dt * A)
              g_dt += ge * a[i];
              gA_acc[i] += ge * d;
            }
          }
          g_dt += g_du * uu;
          g_u += g_du * d;
          store(&gu_buf[t * W], g_u);
          store(&gdt_buf[t * W], g_dt);
        }
        T* gup = gu.data_ptr<T>() + (b * s.dim + c0) * L;
        unpack<T, W>(gu_buf.data(), lanes, L, gup, L);
        unpack<T, W>(gdt_buf.data(), lanes, L, gdt.data_ptr<T>() + (b * s.dim + c0) * L, L);
        if (z) unpack<T, W>(gz_buf.data(), lanes, L, gz.data_ptr<T>() + (b * s.dim + c0) * L, L);
        T* gAp = gA.data_ptr<T>() + (b * s.dim + c0) * N;
        T* gDp = gD.data_ptr<T>() + b * s.dim + c0;
        for (int c = 0; c < lanes; ++c) {
          for (int64_t i = 0; i < N; ++i) gAp[c * N + i] = gA_acc[i][c];
          gDp[c] = gD_acc[c];
        }
      }
      T* gBp = gB.data_ptr<T>() + (b * s.groups + g) * L * N;
      T* gCp = gC.data_ptr<T>() + (b * s.groups + g) * L * N;
      for (int64_t j = 0; j < L * N; ++j) {
        T sb = 0, sc = 0;
        for (int c = 0; c < W; ++c) {
          sb += gB_acc[j][c];
          sc += gC_acc[j][c];
        }
        gBp[j] = sb;
        gCp[j] = sc;
      }
    }
  });
  return {gu, gdt, gA.sum(0), gB, gC, D ? gD.sum(0) : at::Tensor(), gz};
}

void check(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
           const at::Tensor& C) {
  TORCH_CHECK(u.device().is_cpu(), "vmq_fx cpu scan: CPU tensors only");
  TORCH_CHECK(u.dim() == 3 && dt.sizes() == u.sizes(), "u, dt: [batch, dim, L]");
  TORCH_CHECK(B.dim() == 4 && C.dim() == 4 && B.sizes() == C.sizes(), "B, C: [batch, G, N, L]");
  TORCH_CHECK(A.dim() == 2 && A.is_contiguous(), "A: contiguous [dim, N]");
  TORCH_CHECK(u.scalar_type() == dt.scalar_type() && u.scalar_type() == A.scalar_type() &&
                  u.scalar_type() == B.scalar_type() && u.scalar_type() == C.scalar_type(),
              "one dtype for all inputs");
}

std::vector<at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z) {
  check(u, dt, A, B, C);
  if (u.scalar_type() == at::kDouble) return forward_impl<double>(u, dt, A, B, C, D, z);
  TORCH_CHECK(u.scalar_type() == at::kFloat, "float32 or float64 inputs");
  return forward_impl<float>(u, dt, A, B, C, D, z);
}

std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const at::Tensor& gout, const at::Tensor& glast) {
  check(u, dt, A, B, C);
  if (u.scalar_type() == at::kDouble) return backward_impl<double>(u, dt, A, B, C, D, z, gout, glast);
  TORCH_CHECK(u.scalar_type() == at::kFloat, "float32 or float64 inputs");
  return backward_impl<float>(u, dt, A, B, C, D, z, gout, glast);
}

}  // namespace

void register_selective_scan(pybind11::module& m) {
  m.def("selective_scan_fwd", &selective_scan_fwd, "fused selective scan forward: (out, last_state)");
  m.def("selective_scan_bwd", &selective_scan_bwd,
        "fused selective scan backward: (du, ddt, dA, dB [b,G,L,N], dC [b,G,L,N], dD, dz)");
}
