// What the CPU linears' torch wrappers (int8_linear.cpp, vq_linear.cpp) share: per-thread scratch buffers, float32
// views of their inputs, and the torch-free row arithmetic of linear_core.h.
#pragma once

#include <torch/extension.h>

#include <cstring>

#include "linear_core.h"

namespace vmq_fx::linear {

// Per-thread scratch for the temporaries of one call (the quantized activation, a decoded VQ weight): reused across
// calls instead of allocated each time. Fresh allocations of this size are mmap-ed and page-faulted on every call
// with glibc's allocator, which cost as much as the arithmetic for small inputs.
inline at::Tensor scratch(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buf = buffers[slot];
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (!buf.defined() || buf.nbytes() < static_cast<size_t>(bytes)) buf = at::empty({bytes}, at::kByte);
  return buf.narrow(0, 0, bytes).view(dtype).view(sizes);
}

// `t` as a contiguous tensor of `dtype`: itself where it is one already (what the lowering stores), without the
// dispatcher round trips of to() and contiguous() (~0.3-0.6 us of a 6-10 us call of vim-fm-tiny's linears at batch 1).
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// float32 contiguous.
inline at::Tensor f32(const at::Tensor& t) { return as_contiguous(t, at::kFloat); }
inline c10::optional<at::Tensor> f32(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(f32(*t)) : c10::nullopt;
}

}  // namespace vmq_fx::linear
