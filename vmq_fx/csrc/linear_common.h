// What the CPU linears' torch wrappers (int8_linear.cpp, vq_linear.cpp) share: per-thread scratch buffers, float32
// views of their inputs, and the torch-free row arithmetic of linear_core.h.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

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

// Tensors derived from a linear's constant inputs (a dequantized or re-laid weight, a decoded VQ weight), made by
// make() on first use and kept per tuple of source tensors. An entry holds while each source's storage is alive (weak
// references), at the same offset and sizes and unmodified (version counter), so memory freed and reused by another
// tensor, or a weight written in place, is never mistaken for what it was made from. One cache per Kind.
enum DerivedKind : int { kFloatWeight, kDirectWeight, kMaddWeight, kVnniWeight, kAmxWeight, kVqWeight };
template <int Kind, size_t S, typename Make>
VMQ_BUILD_LOCAL std::vector<at::Tensor> cached_derived(const std::array<const at::Tensor*, S>& sources, Make make) {
  struct Source {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t offset;
    std::vector<int64_t> sizes;
    uint32_t version;

    // Inference tensors (made under torch.inference_mode) have no version counter; they cannot be written in place
    // outside that mode.
    static uint32_t version_of(const at::Tensor& t) { return t.is_inference() ? 0 : t._version(); }
    explicit Source(const at::Tensor& t)
        : storage(t.storage().getWeakStorageImpl()), offset(t.storage_offset()), sizes(t.sizes().vec()),
          version(version_of(t)) {}
    bool is(const at::Tensor& t) const {
      return storage.lock().get() == t.storage().unsafeGetStorageImpl() && offset == t.storage_offset() &&
             t.sizes().equals(sizes) && version == version_of(t);
    }
  };
  struct Entry {
    std::vector<Source> sources;
    std::vector<at::Tensor> made;
  };
  static std::mutex mutex;
  static std::unordered_map<const void*, Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(sources[0]->data_ptr());
  if (it != cache.end()) {
    bool same = true;
    for (size_t i = 0; i < S; ++i) same = same && it->second.sources[i].is(*sources[i]);
    if (same) return it->second.made;
  }
  for (auto e = cache.begin(); e != cache.end();) {
    bool alive = true;
    for (const Source& s : e->second.sources) alive = alive && !s.storage.expired();
    e = alive ? std::next(e) : cache.erase(e);
  }
  Entry entry;
  for (const at::Tensor* t : sources) entry.sources.emplace_back(*t);
  entry.made = make();
  const std::vector<at::Tensor> made = entry.made;
  cache.insert_or_assign(sources[0]->data_ptr(), std::move(entry));
  return made;
}

// float32 contiguous.
inline at::Tensor f32(const at::Tensor& t) { return as_contiguous(t, at::kFloat); }
inline c10::optional<at::Tensor> f32(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(f32(*t)) : c10::nullopt;
}

}  // namespace vmq_fx::linear
