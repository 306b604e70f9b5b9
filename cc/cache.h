// Writing new tokens into KV caches: plain C++ on raw pointers, no XLA, no Python.
#pragma once

#include <cstdint>

namespace jaxattn {

// A pool of num_pages pages of page_size rows of row_bytes bytes each (a KV cache [P, L, ...]
// of any element type, or its scales). Row i of `rows` (count rows of row_bytes) goes to row
// slots[i] of page pages[i]; rows whose page or slot is out of range are skipped (never
// written out of bounds). Rows are written in order: the last of duplicates wins.
struct CacheRowWrite {
  void* pool = nullptr;
  int64_t num_pages = 0, page_size = 0, row_bytes = 0;
  const void* rows = nullptr;
  const int32_t* pages = nullptr;
  const int32_t* slots = nullptr;
  int64_t count = 0;
};

void WriteCacheRows(const CacheRowWrite& write);

}  // namespace jaxattn
