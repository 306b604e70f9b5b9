// KV cache writes (cc/cache.h): rows scattered into a cache's pages, in place under buffer
// donation.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cache.h"
#include "ffi/common.h"

namespace jaxattn {
namespace {

// Cache writes: pool [P, L, ...] (aliased to the result: in place under buffer donation),
// rows [B, T, ...] of the pool's dtype and trailing shape, pages and slots [B, T] int32.
ffi::Error CacheWriteImpl(ffi::AnyBuffer pool, ffi::AnyBuffer rows, S32Buffer pages,
                          S32Buffer slots, ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = pool.dimensions(), rd = rows.dimensions();
  if (pd.size() < 2 || rd.size() != pd.size() || rows.element_type() != pool.element_type() ||
      out->element_type() != pool.element_type() ||
      !std::equal(pd.begin() + 2, pd.end(), rd.begin() + 2) ||
      out->dimensions().size() != pd.size() ||
      !std::equal(pd.begin(), pd.end(), out->dimensions().begin())) {
    return InvalidArgument("cache write: rows " + ShapeString(rd) + " do not fit the cache " +
                           ShapeString(pd));
  }
  const int64_t count = rd[0] * rd[1];
  if (pages.element_count() != count || slots.element_count() != count) {
    return InvalidArgument("cache write: pages and slots must have one entry per row");
  }
  CacheRowWrite w;
  w.num_pages = pd[0];
  w.page_size = pd[1];
  w.row_bytes = w.num_pages * w.page_size == 0
                    ? 0
                    : static_cast<int64_t>(pool.size_bytes()) / (w.num_pages * w.page_size);
  w.pool = out->untyped_data();
  // XLA hands the aliased operand's buffer in as the result (copied first unless donated).
  if (w.pool != pool.untyped_data()) std::memcpy(w.pool, pool.untyped_data(), pool.size_bytes());
  w.rows = rows.untyped_data();
  w.pages = pages.typed_data();
  w.slots = slots.typed_data();
  w.count = count;
  WriteCacheRows(w);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CacheWriteHandler, CacheWriteImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()    // pool [P, L, ...] (aliased to the result)
        .Arg<ffi::AnyBuffer>()    // rows [B, T, ...]
        .Arg<S32Buffer>()         // pages [B, T]
        .Arg<S32Buffer>()         // slots [B, T]
        .Ret<ffi::AnyBuffer>());  // the pool

std::vector<FfiTarget> CacheWriteTargets() {
  return {{"jaxattn_cache_write_v1", reinterpret_cast<void*>(CacheWriteHandler)}};
}

}  // namespace jaxattn
