// Fused CPU selective scan (forward and backward) for vmq::selective_scan.
//
// delta_bias and the softplus are applied in the kernel (and differentiated there), so delta is read once.
//
// One task owns a block of W channels (the SIMD lanes of one register: vec.h) of one batch element. Its inputs are
// first copied into time-major [L][W] buffers (whatever the strides of the caller's tensors), then the recurrence runs
// over the state of every lane and every one of the N states (an L1-resident array: selective_scan_core.h's Block):
//
//     h[n] = exp(dt * A[n]) * h[n] + (dt * u) * B[t, n]        y = sum_n h[n] * C[t, n]  (+ D u, * silu(z))
//
// exp is computed once per (t, channel, n). The backward recomputes the forward of its block, keeping the decays and
// states in a per-task buffer, then runs the recurrence in reverse. The gradients of B and C are sums over the
// channels of a group: a backward task therefore owns all channel blocks of one (batch, group) and accumulates them
// lane-wise before one horizontal reduction, so no two tasks write the same memory.
//
// reverse: the recurrence runs from t = L - 1 down to 0 (Vim's backward direction without flipping any tensor): the
// time axis is read through negated strides when packing, and results are written back at the mirrored positions.
//
// The forward's core is torch-free (selective_scan_core.h), shared with the onnxruntime op (ort/selective_scan_op.cpp);
// this file wraps it for torch and holds the backward.
// Parallelism: at::parallel_for over tasks (torch's intra-op thread pool, so torch.set_num_threads applies).
// Portability: GCC / Clang vector extensions one register wide, compiled once per CPU class (vec.h).

#include "kernels.h"
#include "selective_scan_core.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using namespace vmq_fx;
using namespace vmq_fx::scan;

// The views of the core (selective_scan_core.h) on tensors.
template <typename T>
Strided3<T> view3(const at::Tensor& t, bool reverse) {
  return Strided3<T>(t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.size(2), reverse);
}

template <typename T>
StridedBC<T> view_bc(const at::Tensor& t) {  // [batch, G, N, L]
  return StridedBC<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
Shapes shapes_of(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B) {
  return Shapes::of<T>(u.size(0), u.size(1), u.size(2), A.size(1), B.size(1));
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                     const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                     bool softplus, bool reverse, const c10::optional<at::Tensor>& add) {
  const Shapes s = shapes_of<T>(u, A, B);
  const at::Tensor out_rows = at::empty({s.batch, s.length, s.dim}, u.options());
  const at::Tensor last = at::empty({s.batch, s.dim, s.n_state}, u.options());
  const ScanForward<T> fwd{s,
                           view3<T>(u, reverse),
                           view3<T>(delta, reverse),
                           z ? view3<T>(*z, reverse) : Strided3<T>(),
                           add ? view3<T>(*add, reverse) : Strided3<T>(),
                           view_bc<T>(B),
                           view_bc<T>(C),
                           A.data_ptr<T>(),
                           D ? D->data_ptr<T>() : nullptr,
                           delta_bias ? delta_bias->data_ptr<T>() : nullptr,
                           softplus,
                           reverse,
                           out_rows.data_ptr<T>(),
                           last.data_ptr<T>()};
  at::parallel_for(0, fwd.tasks(), 1, [&](int64_t begin, int64_t end) { fwd.run(begin, end); });
  return {out_rows.transpose(1, 2), last};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                      const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                      bool softplus, bool reverse, const at::Tensor& gout, const at::Tensor& glast) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const Shapes s = shapes_of<T>(u, A, B);
  const int64_t L = s.length, N = s.n_state;
  auto opts = u.options();
  auto gu = at::empty({s.batch, s.dim, L}, opts);
  auto gdelta = at::empty({s.batch, s.dim, L}, opts);
  auto gbias = at::empty({s.batch, s.dim}, opts);  // per batch element; summed below
  auto gz = z ? at::empty({s.batch, s.dim, L}, opts) : at::Tensor();
  auto gA = at::empty({s.batch, s.dim, N}, opts);  // per batch element; summed by the caller
  auto gD = at::empty({s.batch, s.dim}, opts);
  auto gB = at::empty({s.batch, s.groups, L, N}, opts);  // time-major; the caller transposes
  auto gC = at::empty({s.batch, s.groups, L, N}, opts);
  const Strided3<T> su = view3<T>(u, reverse), sdt = view3<T>(delta, reverse), sg = view3<T>(gout, reverse);
  const Strided3<T> sz = z ? view3<T>(*z, reverse) : Strided3<T>();
  const StridedBC<T> sB = view_bc<T>(B), sC = view_bc<T>(C);
  const T* Ap = A.data_ptr<T>();
  const T* Dp = D ? D->data_ptr<T>() : nullptr;
  const T* biasp = delta_bias ? delta_bias->data_ptr<T>() : nullptr;
  const T* glp = glast.data_ptr<T>();
  const int64_t gl_sb = glast.stride(0), gl_sc = glast.stride(1), gl_sn = glast.stride(2);
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ubuf(L * W), dbuf(L * W), ybuf(L * W), zbuf(z ? L * W : 0), gbuf(L * W), bbuf(L * N),
        cbuf(L * N), gu_buf(L * W), gdt_buf(L * W), gz_buf(z ? L * W : 0), sig(softplus ? L * W : 0);
    std::vector<V> a(N), a_scaled(N), h(N), carry(N), gA_acc(N), decay(L * N), hs(L * N), gB_acc(L * N),
        gC_acc(L * N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.groups, g = task % s.groups;
      sB.pack(b, g, N, L, reverse, bbuf.data());
      sC.pack(b, g, N, L, reverse, cbuf.data());
      std::fill(gB_acc.begin(), gB_acc.end(), V{});
      std::fill(gC_acc.begin(), gC_acc.end(), V{});
      for (int64_t blk_i = 0; blk_i < s.blocks_per_group; ++blk_i) {
        const int64_t c0 = g * s.per_group + blk_i * W;
        const int lanes = static_cast<int>(std::min<int64_t>(W, (g + 1) * s.per_group - c0));
        su.template pack<W>(b, c0, lanes, L, ubuf.data());
        sdt.template pack<W>(b, c0, lanes, L, dbuf.data());
        if (biasp || softplus) discretize<T>(dbuf.data(), biasp, c0, lanes, L, softplus, softplus ? sig.data() : nullptr);
        sg.template pack<W>(b, c0, lanes, L, gbuf.data());
        if (z) sz.template pack<W>(b, c0, lanes, L, zbuf.data());
        for (int64_t i = 0; i < N; ++i) {
          V v = V{}, cv = V{};
          for (int c = 0; c < lanes; ++c) {
            v[c] = Ap[(c0 + c) * N + i];
            cv[c] = glp[b * gl_sb + (c0 + c) * gl_sc + i * gl_sn];
          }
          a[i] = v;
          a_scaled[i] = v * decay_scale<T>();
          carry[i] = cv;
          gA_acc[i] = V{};
        }
        dispatch_state<T>(N, [&](auto ns) {
          Block<T, decltype(ns)::value> blk{L, N, dbuf.data(), {ubuf.data(), W}, {bbuf.data(), N}, {cbuf.data(), N},
                                            a_scaled.data()};
          blk.forward(ybuf.data(), h.data(), decay.data(), hs.data());
        });
        V dv = V{};
        if (Dp)
          for (int c = 0; c < lanes; ++c) dv[c] = Dp[c0 + c];
        V gD_acc = V{}, gbias_acc = V{};
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
          if (softplus) g_dt = g_dt * load<V>(&sig[t * W]);  // d softplus / d raw
          gbias_acc += g_dt;
          store(&gu_buf[t * W], g_u);
          store(&gdt_buf[t * W], g_dt);
        }
        T* gup = gu.data_ptr<T>() + (b * s.dim + c0) * L;
        unpack<T, W>(gu_buf.data(), lanes, L, reverse, gup, L);
        unpack<T, W>(gdt_buf.data(), lanes, L, reverse, gdelta.data_ptr<T>() + (b * s.dim + c0) * L, L);
        if (z) unpack<T, W>(gz_buf.data(), lanes, L, reverse, gz.data_ptr<T>() + (b * s.dim + c0) * L, L);
        T* gAp = gA.data_ptr<T>() + (b * s.dim + c0) * N;
        T* gDp = gD.data_ptr<T>() + b * s.dim + c0;
        T* gbp = gbias.data_ptr<T>() + b * s.dim + c0;
        for (int c = 0; c < lanes; ++c) {
          for (int64_t i = 0; i < N; ++i) gAp[c * N + i] = gA_acc[i][c];
          gDp[c] = gD_acc[c];
          gbp[c] = gbias_acc[c];
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
        const int64_t at = reverse ? (L - 1 - j / N) * N + j % N : j;  // j = t * N + n in scan order
        gBp[at] = sb;
        gCp[at] = sc;
      }
    }
  });
  return {gu, gdelta, gA.sum(0), gB, gC, D ? gD.sum(0) : at::Tensor(), gz,
          delta_bias ? gbias.sum(0) : at::Tensor()};
}

// The contract of vmq::selective_scan, with the messages of the Python implementation (ValueError in Python).
void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& add) {
  TORCH_CHECK_VALUE(u.dim() == 3, "vmq.selective_scan: u must be [batch, dim, L], got shape ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  TORCH_CHECK_VALUE(delta.sizes() == u.sizes(), "vmq.selective_scan: delta must have u's shape ", u.sizes(),
                    ", got ", delta.sizes());
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == dim, "vmq.selective_scan: A must be [dim=", dim, ", N], got ",
                    A.sizes());
  TORCH_CHECK_VALUE(!A.is_complex(), "vmq.selective_scan: complex A is not supported (Visual Mamba models use real A)");
  const int64_t n = A.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"B", B}, {"C", C}}) {
    const bool ok = t.dim() == 3   ? t.size(0) == batch && t.size(1) == n && t.size(2) == length
                    : t.dim() == 4 ? t.size(0) == batch && t.size(2) == n && t.size(3) == length &&
                                         t.size(1) > 0 && dim % t.size(1) == 0
                                   : false;
    TORCH_CHECK_VALUE(ok, "vmq.selective_scan: ", name, " must be [batch=", batch, ", N=", n, ", L=", length,
                      "] or [batch, G, N, L] with G dividing dim=", dim, ", got ", t.sizes(),
                      " (input-independent B/C of shape [dim, N] are not supported)");
  }
  TORCH_CHECK_VALUE(!(B.dim() == 4 && C.dim() == 4 && B.size(1) != C.size(1)),
                    "vmq.selective_scan: B and C must have the same number of groups, got ", B.size(1), " and ",
                    C.size(1));
  TORCH_CHECK_VALUE(!D || (D->dim() == 1 && D->size(0) == dim), "vmq.selective_scan: D must be [dim=", dim,
                    "], got ", D ? D->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!delta_bias || (delta_bias->dim() == 1 && delta_bias->size(0) == dim),
                    "vmq.selective_scan: delta_bias must be [dim=", dim, "], got ",
                    delta_bias ? delta_bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!z || z->sizes() == u.sizes(), "vmq.selective_scan: z must have u's shape ", u.sizes(), ", got ",
                    z ? z->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!add || add->sizes() == u.sizes(), "vmq.selective_scan: add must have u's shape ", u.sizes(),
                    ", got ", add ? add->sizes() : at::IntArrayRef{});
}

// The kernels' view of the inputs: one compute dtype (float64 if any input is, else float32, as mamba-ssm), B and C
// as [batch, G, N, L] (a shared [batch, N, L] broadcast over the groups without a copy), vectors contiguous.
struct Prepared {
  at::ScalarType cdt;
  at::Tensor u, delta, A, B, C;
  std::optional<at::Tensor> D, z, delta_bias;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& delta_bias) {
  bool f64 = false;
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C}) f64 |= t->scalar_type() == at::kDouble;
  for (const auto* t : {&D, &z, &delta_bias}) f64 |= t->has_value() && (*t)->scalar_type() == at::kDouble;
  const at::ScalarType cdt = f64 ? at::kDouble : at::kFloat;
  const int64_t groups = B.dim() == 4 ? B.size(1) : C.dim() == 4 ? C.size(1) : 1;
  auto grouped = [&](const at::Tensor& t) {
    const at::Tensor c = t.to(cdt);
    return c.dim() == 3 ? c.unsqueeze(1).expand({-1, groups, -1, -1}) : c;
  };
  auto vec = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return t->to(cdt).contiguous();
  };
  std::optional<at::Tensor> zc;
  if (z) zc = z->to(cdt);
  return {cdt, u.to(cdt), delta.to(cdt), A.to(cdt).contiguous(), grouped(B), grouped(C), vec(D), zc,
          vec(delta_bias)};
}

}  // namespace

namespace vmq_fx {

std::tuple<at::Tensor, at::Tensor> selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                      const std::optional<at::Tensor>& D,
                                                      const std::optional<at::Tensor>& z,
                                                      const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                      bool reverse, const std::optional<at::Tensor>& add) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, add);
  const Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias);
  // The output pass adds where every dtype is the compute dtype; else torch's add on the result, as in Python.
  const bool in_kernel = add && add->scalar_type() == p.cdt && u.scalar_type() == p.cdt;
  const std::optional<at::Tensor> kernel_add = in_kernel ? add : std::nullopt;
  const auto r = p.cdt == at::kDouble ? forward_impl<double>(p.u, p.delta, p.A, p.B, p.C, p.D, p.z, p.delta_bias,
                                                             softplus, reverse, kernel_add)
                                      : forward_impl<float>(p.u, p.delta, p.A, p.B, p.C, p.D, p.z, p.delta_bias,
                                                            softplus, reverse, kernel_add);
  at::Tensor out = r[0].to(u.scalar_type());
  if (add && !in_kernel) out.add_(*add);
  return {out, r[1].to(A.scalar_type())};
}

std::vector<at::Tensor> selective_scan_backward_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                    const at::Tensor& B, const at::Tensor& C,
                                                    const std::optional<at::Tensor>& D,
                                                    const std::optional<at::Tensor>& z,
                                                    const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                    bool reverse, const at::Tensor& grad_out,
                                                    const at::Tensor& grad_last) {
  const Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias);
  const auto g = p.cdt == at::kDouble
                     ? backward_impl<double>(p.u, p.delta, p.A, p.B, p.C, p.D, p.z, p.delta_bias, softplus, reverse,
                                             grad_out.to(p.cdt), grad_last.to(p.cdt))
                     : backward_impl<float>(p.u, p.delta, p.A, p.B, p.C, p.D, p.z, p.delta_bias, softplus, reverse,
                                            grad_out.to(p.cdt), grad_last.to(p.cdt));
  auto bc = [](const at::Tensor& grad, const at::Tensor& like) {  // [b, G, L, N] -> like's layout and dtype
    at::Tensor t = grad.transpose(2, 3);
    return (like.dim() == 3 ? t.sum(1) : t).to(like.scalar_type()).contiguous();
  };
  auto like = [](const at::Tensor& grad, const std::optional<at::Tensor>& t) {
    return t ? grad.to(t->scalar_type()) : at::Tensor();
  };
  return {g[0].to(u.scalar_type()), g[1].to(delta.scalar_type()), g[2].to(A.scalar_type()), bc(g[3], B),
          bc(g[4], C), like(g[5], D), like(g[6], z), like(g[7], delta_bias)};
}

// vmq::selective_scan_backward returns a Tensor[]: an absent optional input's gradient is an empty tensor there (the
// kernel leaves it undefined).
static std::vector<at::Tensor> selective_scan_backward_op(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                const at::Tensor& B, const at::Tensor& C,
                                                const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                                const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                bool reverse, const at::Tensor& grad_out, const at::Tensor& grad_last) {
  auto grads = selective_scan_backward_cpu(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, grad_out,
                                                   grad_last);
  for (auto& g : grads)
    if (!g.defined()) g = at::empty({0}, u.options());
  return grads;
}

static void register_selective_scan(torch::Library& cpu, torch::Library& autograd_cpu) {
  cpu.impl("selective_scan", TORCH_FN(selective_scan_cpu));
  cpu.impl("selective_scan_backward", TORCH_FN(selective_scan_backward_op));
  for (const char* op : {"selective_scan", "selective_scan_backward"})
    autograd_cpu.impl(op, torch::CppFunction::makeFromBoxedFunction<&backward_in_python>());
}
VMQ_FX_CPU_KERNELS(register_selective_scan);

}  // namespace vmq_fx
