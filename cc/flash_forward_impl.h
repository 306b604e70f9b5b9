// Flash attention forward for one instruction set (see simd.h for how this file is
// included; flash_impl.h has the overview). Per query tile: S = (scale Q) K^T, the logits'
// transformation, online softmax, dropout, O += P V; the lse saved for the backward.
#pragma once
#include "cache_rows_impl.h"
#include "dropout.h"
#include "flash_logits.h"
#include "flash_products.h"
#include "flash_tiles.h"
#include "online_softmax.h"

struct ForwardJob {
  FlashContext c;
  FlashForwardResult res;
};

static void ZeroOutputRows(const AttentionProblem& p, const FlashForwardResult& res,
                           const RowInfo* rows, int64_t num_rows, int64_t b) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    __builtin_memset(Offset(res.out, p.dtype, row * p.value_dim), 0,
                     p.value_dim * DTypeSize(p.dtype));
    res.lse[row] = -kInf;
  }
}

static void ForwardTask(void* job_ptr, int64_t task) {
  const ForwardJob& job = *static_cast<const ForwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const QueryTileTask qt = QueryTileOfTask(c, task);
  const int64_t kv_head = qt.kv_head, b = qt.b, t0 = qt.t0, t1 = qt.t1, tv1 = qt.tv1;
  const int64_t kv_len = qt.kv_len, max_rows = qt.max_rows;
  const int64_t mrp = PaddedRows(c, max_rows);
  const int64_t bk = c.keys_per_tile, bkp = PaddedInner(c, bk);
  AmxTaskTiles amx_tiles(c.mode == ProductMode::kAmxTiles);

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *q = nullptr, *o = nullptr, *s = nullptr, *m = nullptr, *l = nullptr, *kt = nullptr;
  float *v = nullptr, *block = nullptr, *prob_pairs = nullptr, *cache_rows = nullptr;
  uint32_t* drop_keys = nullptr;  // dropout: the rows' keys, k0 then k1
  const int64_t cache_tile = KvTileScratch(p, bk, MaxI(p.head_dim, p.value_dim));
  if (!CarveTaskScratch(c, bk, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        q = carve.Take(mrp * c.hp);
        o = carve.Take(mrp * c.hvp);
        s = carve.Take(mrp * bkp);
        m = carve.Take(max_rows);
        l = carve.Take(max_rows);
        kt = carve.Take(c.hp * bkp);
        v = carve.Take(bk * c.hvp);
        block = carve.Take(kVL * c.hp);
        prob_pairs = carve.Take(mrp * bkp / 2);
        cache_rows = carve.Take(cache_tile);  // a quantized cache's dequantised tile
        if (HasDropout(p)) drop_keys = reinterpret_cast<uint32_t*>(carve.Take(2 * max_rows));
      })) {
    return;
  }

  const int64_t num_rows = QueryTileRows(c, kv_head, t0, tv1, rows);
  {
    RowInfo dead[1];
    for (int64_t t = tv1; t < t1; ++t) {
      for (int64_t g = 0; g < c.group; ++g) {
        dead[0] = RowInfo{t, kv_head * c.group + g};
        ZeroOutputRows(p, job.res, dead, 1, b);
      }
    }
  }
  if (num_rows == 0) return;

  if (HasDropout(p)) {
    DropoutRowKeys(p, b, rows, num_rows, num_rows, drop_keys, drop_keys + max_rows);
  }
  RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackDotRows(c, p.query, offsets, num_rows, p.head_dim, p.scale, q);
  ZeroPaddingRows(c, q, num_rows, DotLd(c, p.head_dim));
  for (int64_t r = 0; r < num_rows; ++r) {
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  __builtin_memset(o, 0, PaddedRows(c, num_rows) * c.hvp * sizeof(float));

  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  TileCursor tiles = KeyTilesOf(c, qt);
  TileKind kind;
  for (Tile tile; NextVisibleKeyTile(c, qt, &tiles, &tile, &kind);) {
    const int64_t s0 = tile.start, nk = tile.count, nkp = PaddedInner(c, nk);
    // A packed block holds the keys up to the sequence's end, zeros past it: usable unless
    // key lengths cut the tile shorter (the values past them may be anything, even NaN).
    const float* key_columns = kt;
    const float* value_pairs = v;
    int64_t ld_keys = nkp;
    if (c.packed_keys != nullptr && s0 % bk == 0 && nk == MinI(bk, p.kv_len - s0)) {
      const int64_t blocks = CeilDiv(p.kv_len, bk), block = s0 / bk;
      key_columns =
          c.packed_keys + ((kb * p.num_kv_heads + kv_head) * blocks + block) * c.key_block_floats;
      value_pairs = c.packed_values +
                    ((vb * p.num_kv_heads + kv_head) * blocks + block) * c.value_block_floats;
      ld_keys = bk;
    } else {
      const void* keys = KvTileRows(p, false, kb, s0, nk, kv_head, offsets, cache_rows);
      PackDotColumns(c, keys, offsets, nk, p.head_dim, 1.0f, kt, nkp, block);
      const void* values = KvTileRows(p, true, vb, s0, nk, kv_head, offsets, cache_rows);
      PackAcrossRows(c, values, offsets, nk, p.value_dim, v);
    }

    const bool full = kind == TileKind::kFull;
    // Without bias, masks, segment ids or ALiBi, on a tile ClassifyTile found fully visible
    // (by index or by position), the softmax scales the logits and applies the soft cap
    // itself (one pass over the tile less; the same operations, so the same bits).
    const bool transform = p.bias.data != nullptr || p.mask.data != nullptr || !full ||
                           tile.mask != nullptr || qt.ti.q_seg != nullptr ||
                           qt.ti.slopes != nullptr;
    // Bf16 pairs: P is rounded to pairs as it is computed (the rows past num_rows, which
    // AMX multiplies, are zero). Float32: P in place of the logits.
    uint32_t* prob_words = Pairs(c) ? reinterpret_cast<uint32_t*>(prob_pairs) : nullptr;
    if (prob_words != nullptr) {
      __builtin_memset(prob_words + num_rows * (nkp / 2), 0,
                       (PaddedRows(c, num_rows) - num_rows) * (nkp / 2) * sizeof(uint32_t));
    }
    // AMX: 32 rows at a time (two row tiles), so that a slab's logits stay in the L1 cache
    // from the product through the softmax to the P V product. Results do not depend on it.
    int64_t slab = c.mode == ProductMode::kAmxTiles ? 32 : num_rows;
    for (int64_t r0 = 0; r0 < num_rows; r0 += slab) {
      const int64_t nr = MinI(slab, num_rows - r0);
      float* ss = s + r0 * nkp;
      LogitsGemm(c, nr, nkp, q + r0 * DotLd(c, p.head_dim), key_columns, ld_keys, ss, nkp,
                 /*scaled=*/transform);
      if (transform) {
        TransformLogits<false>(c, b, rows + r0, nr, s0, nk, kv_len, full,
                               tile.mask != nullptr ? tile.mask + r0 * kKeysPerTile : nullptr, ss,
                               nkp, nullptr);
      }
      for (int64_t r = r0; r < r0 + nr; ++r) {
        OnlineSoftmaxStep(s + r * nkp, nk, nkp, &m[r], &l[r], o + r * c.hvp, c.hvp,
                          transform ? 1.0f : PairsScale(c),
                          prob_words != nullptr ? prob_words + r * (nkp / 2) : nullptr,
                          transform ? 0.0f : p.soft_cap);
        if (HasDropout(p)) {  // after the normaliser took the undropped weights
          const DropoutRowKey key{drop_keys[r], drop_keys[max_rows + r]};
          if (prob_words != nullptr) {
            DropoutRowPairs(p, key, s0, prob_words + r * (nkp / 2), nkp / 2);
          } else {
            DropoutRow(p, key, s0, s + r * nkp, nkp);
          }
        }
      }
      const float* prob = prob_words != nullptr ? prob_pairs + r0 * (nkp / 2) : ss;
      ProductGemm(c, nr, c.hvp, nk, prob, prob_words != nullptr ? nkp / 2 : nkp, value_pairs, c.hvp,
                  o + r0 * c.hvp, c.hvp, true);
    }
  }

  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    void* out_row = Offset(job.res.out, p.dtype, row * p.value_dim);
    if (l[r] > 0.0f || l[r] != l[r]) {
      StoreRow(p.dtype, o + r * c.hvp, p.value_dim, DropoutKeepScale(p) / l[r], out_row);
      job.res.lse[row] = m[r] + __builtin_logf(l[r]);
    } else {
      __builtin_memset(out_row, 0, p.value_dim * DTypeSize(p.dtype));
      job.res.lse[row] = -kInf;
    }
  }
}

// Packs K and V block by block (c.keys_per_tile keys from key 0; a block past the sequence's
// end zero there) into the buffers c.packed_keys / c.packed_values point to: the forward's
// operand layouts (PackDotColumns, PackAcrossRows), once per call instead of once per query
// tile. Tasks: the key blocks of every (kv batch, kv head), then the value blocks.
static void PackKeyValueTask(void* job_ptr, int64_t task) {
  const FlashContext& c = *static_cast<const FlashContext*>(job_ptr);
  const AttentionProblem& p = *c.p;
  const int64_t bk = c.keys_per_tile, blocks = CeilDiv(p.kv_len, bk);
  const int64_t key_tasks = p.kv_batch * p.num_kv_heads * blocks;
  const bool keys = task < key_tasks;
  const int64_t index = keys ? task : task - key_tasks;
  const int64_t block = index % blocks, head = index / blocks;
  const int64_t kv_head = head % p.num_kv_heads, batch = head / p.num_kv_heads;
  const int64_t s0 = block * bk, nk = MinI(bk, p.kv_len - s0);
  const int64_t dim = keys ? p.head_dim : p.value_dim;
  int64_t* offsets = nullptr;
  float *transpose_block = nullptr, *cache_rows = nullptr;
  const int64_t cache_tile = KvTileScratch(p, bk, dim);
  if (!CarveTaskScratch(c, 0, [&](Carver& carve) {
        offsets = reinterpret_cast<int64_t*>(carve.Take(bk * 2));
        transpose_block = carve.Take(kVL * RoundUp(dim, kVL));
        cache_rows = carve.Take(cache_tile);
      })) {
    return;
  }
  const void* base = KvTileRows(p, !keys, batch, s0, nk, kv_head, offsets, cache_rows);
  if (keys) {
    float* dst = const_cast<float*>(c.packed_keys) + index * c.key_block_floats;
    PackDotColumns(c, base, offsets, nk, dim, 1.0f, dst, bk, transpose_block);
  } else {
    float* dst = const_cast<float*>(c.packed_values) + index * c.value_block_floats;
    PackAcrossRows(c, base, offsets, nk, dim, dst);
  }
}

// sparse: nullptr for flash attention, else the block-sparse tiles to visit.
// Returns the bytes of scratch memory that could not be allocated (0: none, the results are
// written).
static int64_t RunForward(const AttentionProblem& p, const BlockSparseTables* sparse,
                          ProductMode bf16_mode, const FlashForwardResult& res,
                          const Parallel& parallel) {
  ForwardJob job{ContextFor(p, sparse, bf16_mode), res};
  FlashContext& c = job.c;
  float* packed = nullptr;
  if (c.mode == ProductMode::kAmxTiles) {
    const int64_t bk = c.keys_per_tile, blocks = CeilDiv(p.kv_len, bk);
    c.key_block_floats = DotLd(c, p.head_dim) * bk;
    c.value_block_floats = bk / 2 * RoundUp(p.value_dim, kVL);
    const int64_t key_floats = p.kv_batch * p.num_kv_heads * blocks * c.key_block_floats;
    const int64_t value_floats = p.value_batch * p.num_kv_heads * blocks * c.value_block_floats;
    packed = static_cast<float*>(__builtin_malloc((key_floats + value_floats) * sizeof(float)));
    if (packed != nullptr) {  // else every task packs its own tiles
      c.packed_keys = packed;
      c.packed_values = packed + key_floats;
      parallel.For((p.kv_batch + p.value_batch) * p.num_kv_heads * blocks, PackKeyValueTask, &c);
    }
  }
  if (c.scratch_failed == 0) {
    const int64_t tasks = p.batch * p.num_kv_heads * c.num_q_tiles;
    parallel.For(tasks, ForwardTask, &job);
  }
  __builtin_free(packed);
  return c.scratch_failed;
}

template <ProductMode kBF16Mode>
static int64_t ForwardImpl(const AttentionProblem& p, const FlashForwardResult& res,
                           const Parallel& parallel) {
  return RunForward(p, nullptr, kBF16Mode, res, parallel);
}
