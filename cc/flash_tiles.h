// Which tiles a flash task visits, for one instruction set (see simd.h for how this file is
// included): the order of the tasks, the query rows of a tile, and a TileCursor over the key
// (or query) tiles the analytic masks leave or a block-sparse table row lists, so that one
// routine does the work of flash and block-sparse attention.
#pragma once
#include "flash_context.h"

// Tasks go head by head (consecutive tasks share K/V tiles in cache), and within a head the
// costliest tiles first: under a causal mask the last query tiles see the most keys (and the
// first key tiles the most queries). Claimed from a shared counter in that order, the threads
// end on the short tiles of the last head and finish together.
struct TaskTile {
  int64_t tile, kv_head, b;
};
static inline TaskTile TileOfTask(const AttentionProblem& p, int64_t task, int64_t num_tiles,
                                  bool costliest_last) {
  const int64_t rank = task % num_tiles, head = task / num_tiles;
  return TaskTile{costliest_last ? num_tiles - 1 - rank : rank, head % p.num_kv_heads,
                  head / p.num_kv_heads};
}

struct RowInfo {
  int64_t t;  // query position
  int64_t n;  // query head
};

// Element offsets of the rows of a query tile: positions [t0, t1) x the group's heads.
static int64_t QueryTileRows(const FlashContext& c, int64_t kv_head, int64_t t0, int64_t t1,
                             RowInfo* rows) {
  int64_t r = 0;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g) rows[r++] = RowInfo{t, kv_head * c.group + g};
  }
  return r;
}

// Offsets (in elements) of rows of a [batch, len, heads, dim] tensor.
static void RowOffsets(const RowInfo* rows, int64_t num_rows, int64_t batch_index, int64_t len,
                       int64_t heads, int64_t dim, int64_t* offsets) {
  for (int64_t r = 0; r < num_rows; ++r) {
    offsets[r] = ((batch_index * len + rows[r].t) * heads + rows[r].n) * dim;
  }
}
static void KeyOffsets(int64_t s0, int64_t num_keys, int64_t batch_index, int64_t len,
                       int64_t kv_head, int64_t kv_heads, int64_t dim, int64_t* offsets) {
  for (int64_t j = 0; j < num_keys; ++j) {
    offsets[j] = ((batch_index * len + s0 + j) * kv_heads + kv_head) * dim;
  }
}

// One tile a task visits: positions [start, start + count) along the other axis, and for a
// partial block-sparse tile its element mask (nonzero = attend): [rows, kKeysPerTile] for a
// query-major task, [kKeysPerTile, rows_padded] for a key-major one.
struct Tile {
  int64_t start = 0, count = 0;
  const uint8_t* mask = nullptr;
};

// The tiles one task visits, in increasing order: [next, end) in steps of `step` (dense), or
// entries [next, end) of a block-sparse table (entries != nullptr) whose tile ids count
// `step` positions each, clipped to `length`.
struct TileCursor {
  int64_t next = 0, end = 0, step = 1, length = 0;
  const int32_t* entries = nullptr;  // [*, 2]: tile id, mask id (-1: full)
  const uint8_t* masks = nullptr;
  int64_t mask_size = 0;
};

static inline TileCursor DenseTiles(int64_t lo, int64_t hi, int64_t step) {
  TileCursor cursor;
  cursor.next = lo;
  cursor.end = hi;
  cursor.step = step;
  cursor.length = hi;
  return cursor;
}

// Row `row` of a block-sparse table (indptr, entries) over tiles of `step` positions.
static inline TileCursor TableTiles(const int32_t* indptr, const int32_t* entries, int64_t row,
                                    int64_t step, int64_t length, const uint8_t* masks,
                                    int64_t mask_size) {
  TileCursor cursor;
  cursor.next = indptr[row];
  cursor.end = indptr[row + 1];
  cursor.step = step;
  cursor.length = length;
  cursor.entries = entries;
  cursor.masks = masks;
  cursor.mask_size = mask_size;
  return cursor;
}

static inline bool NextTile(TileCursor* cursor, Tile* tile) {
  if (cursor->next >= cursor->end) return false;
  if (cursor->entries == nullptr) {
    tile->start = cursor->next;
    cursor->next += cursor->step;
    tile->mask = nullptr;
  } else {
    const int32_t* e = cursor->entries + 2 * cursor->next++;
    tile->start = e[0] * cursor->step;
    tile->mask = e[1] < 0 ? nullptr : cursor->masks + e[1] * cursor->mask_size;
  }
  tile->count = MinI(cursor->step, cursor->length - tile->start);
  return true;
}

// The query tile of a query-major task (the forward, the backward's query pass, the
// tangent): rows are positions [t0, t1) times the group's heads; those from tv1 on (at or
// past the batch element's query length) see nothing and only have zeros written.
struct QueryTileTask {
  int64_t q_tile, kv_head, b;
  int64_t t0, t1, tv1;
  int64_t kv_len;    // batch element b's key length
  int64_t max_rows;  // (t1 - t0) x the group
  TokenInfo ti;      // batch element b's positions, segment ids and slopes
};
static inline QueryTileTask QueryTileOfTask(const FlashContext& c, int64_t task) {
  const AttentionProblem& p = *c.p;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  QueryTileTask qt;
  qt.q_tile = tt.tile;
  qt.kv_head = tt.kv_head;
  qt.b = tt.b;
  qt.t0 = tt.tile * c.positions_per_tile;
  qt.t1 = MinI(p.q_len, qt.t0 + c.positions_per_tile);
  qt.tv1 = MaxI(qt.t0, MinI(qt.t1, QueryLength(p, tt.b)));
  qt.kv_len = KeyLength(p, tt.b);
  qt.max_rows = (qt.t1 - qt.t0) * c.group;
  qt.ti = TokenInfoOf(p, tt.b);
  return qt;
}

// The key tiles the rows [t0, tv1) of a query tile visit: those the analytic masks leave, or
// those of its row in the block-sparse table.
static inline TileCursor KeyTilesOf(const FlashContext& c, const QueryTileTask& qt) {
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (qt.kv_head % st.groups) * st.num_q_tiles + qt.q_tile;
    return TableTiles(st.q_indptr, st.q_entries, row, kKeysPerTile, c.p->kv_len, st.masks,
                      c.positions_per_tile * c.group * kKeysPerTile);
  }
  int64_t lo, hi;
  KeyRange(*c.p, qt.t0, qt.tv1, qt.kv_len, &lo, &hi);
  if (qt.ti.by_position && c.keys_monotone) {
    // Only tiles ClassifyTile finds hidden are left out: the rest keep the grid from key 0
    // and their lengths, so the results stay bitwise those of visiting every tile.
    KeyRangeByPosition(*c.p, qt.ti, qt.t0, qt.tv1, qt.kv_len, &lo, &hi);
    lo -= lo % c.keys_per_tile;
    hi = MinI(qt.kv_len, RoundUp(hi, c.keys_per_tile));
  }
  // AMX: on the grid of the packed blocks (a window's first tile then starts masked).
  if (c.mode == ProductMode::kAmxTiles) lo -= lo % c.keys_per_tile;
  return DenseTiles(lo, hi, c.keys_per_tile);
}

// The next key tile of a query tile that something in it sees (ClassifyTile: positions and
// segment ids hide whole tiles), and *kind, partial or full.
static inline bool NextVisibleKeyTile(const FlashContext& c, const QueryTileTask& qt,
                                      TileCursor* cursor, Tile* tile, TileKind* kind) {
  while (NextTile(cursor, tile)) {
    *kind =
        ClassifyTile(*c.p, qt.ti, qt.t0, qt.tv1, tile->start, tile->start + tile->count, qt.kv_len);
    if (*kind != TileKind::kHidden) return true;
  }
  return false;
}

// The query tiles key tile k_tile (keys [s0, s1), below its batch element's key length, whose
// positions and ids ti holds) is seen by, likewise.
static inline TileCursor QueryTilesOf(const FlashContext& c, const TokenInfo& ti, int64_t kv_head,
                                      int64_t k_tile, int64_t s0, int64_t s1, int64_t q_len) {
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (kv_head % st.groups) * st.num_k_tiles + k_tile;
    return TableTiles(st.k_indptr, st.k_entries, row, c.positions_per_tile, c.p->q_len, st.masks_t,
                      kKeysPerTile * c.rows_padded);
  }
  int64_t lo, hi;
  QueryRange(*c.p, s0, s1, q_len, &lo, &hi);
  if (ti.by_position && c.queries_monotone) {  // on the grid from query 0, as KeyTilesOf
    QueryRangeByPosition(*c.p, ti, s0, s1, q_len, &lo, &hi);
    lo -= lo % c.positions_per_tile;
    hi = MinI(q_len, RoundUp(hi, c.positions_per_tile));
  }
  return DenseTiles(lo, hi, c.positions_per_tile);
}
