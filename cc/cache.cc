#include "cache.h"

#include <cstring>

namespace jaxattn {

void WriteCacheRows(const CacheRowWrite& w) {
  char* pool = static_cast<char*>(w.pool);
  const char* rows = static_cast<const char*>(w.rows);
  for (int64_t i = 0; i < w.count; ++i) {
    const int64_t page = w.pages[i], slot = w.slots[i];
    if (page < 0 || page >= w.num_pages || slot < 0 || slot >= w.page_size) continue;
    std::memcpy(pool + (page * w.page_size + slot) * w.row_bytes, rows + i * w.row_bytes,
                w.row_bytes);
  }
}

}  // namespace jaxattn
