// Flash attention backward for one instruction set (see simd.h for how this file is
// included; flash_impl.h has the overview): the query pass (D, dQ, dlogits) and the key
// pass (dK, dV), each writing only its own rows.
#pragma once
#include "dropout.h"
#include "flash_logits.h"
#include "flash_products.h"
#include "flash_tiles.h"
#include "online_softmax.h"

struct BackwardJob {
  FlashContext c;
  FlashBackwardArgs args;
  float* delta;  // [B, T, N]: rowsum(dO * O) - dlse
  // [B, T, N]: log(sum_j exp(s_j - lse)), the amount by which the float32 lse misses the
  // recomputed logits' normaliser (P = exp(s - lse - norm)). About 0, except where |lse| is
  // so large that log(l) was rounded away from m + log(l): with a finite bias of -1e9 or
  // finfo.min masking a whole row, lse == m and every P would be 1 instead of 1/S.
  float* norm;
  // [B, T, N, 2] with dropout: the rows' keys (DropoutRowKeyOf), written by the query pass,
  // read by the key pass (which would otherwise derive them again for every key tile).
  uint32_t* dropout_keys;
};

// dS = P * (dP - D) [* (1 - tanh^2) with a soft cap], in place in dp. With dropout (a query
// row's line, or nullptr), dP o Z' in place of dP: scaled where kept, 0 where dropped.
static inline void LogitsGradRow(const float* prob, float* dp, const float* tanh_row, int64_t n,
                                 float delta_scalar, const float* delta_vec,
                                 const DropoutLine* dropout = nullptr, float keep_scale = 1.0f) {
  for (int64_t j = 0; j < n; j += kVL) {
    const VF d = delta_vec ? Load(delta_vec + j) : Splat(delta_scalar);
    VF dpj = Load(dp + j);
    if (dropout != nullptr) dpj = DropoutApply(dpj, keep_scale, dropout->Keep(j));
    VF ds = Load(prob + j) * (dpj - d);
    if (tanh_row != nullptr) {
      const VF th = Load(tanh_row + j);
      ds = ds * (1.0f - th * th);
    }
    Store(dp + j, ds);
  }
}

// Pass 1, per query tile: D, and dQ and/or dlogits.
static void QueryGradTask(void* job_ptr, int64_t task) {
  const BackwardJob& job = *static_cast<const BackwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashBackwardArgs& a = job.args;
  const QueryTileTask qt = QueryTileOfTask(c, task);
  const int64_t kv_head = qt.kv_head, b = qt.b, t0 = qt.t0, t1 = qt.t1, tv1 = qt.tv1;
  const int64_t kv_len = qt.kv_len, max_rows = qt.max_rows;
  const int64_t mrp = PaddedRows(c, max_rows);
  const int64_t bk = c.keys_per_tile, bkp = PaddedInner(c, bk);
  const bool has_cap = p.soft_cap > 0.0f;
  const bool amx = c.mode == ProductMode::kAmxTiles;
  AmxTaskTiles amx_tiles(amx);
  const int64_t row_dots_scratch = amx ? 256 + c.hvp * mrp : 0;

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *q = nullptr, *dout = nullptr, *dq = nullptr, *s = nullptr, *dp = nullptr;
  float *th = nullptr, *lse = nullptr, *delta = nullptr, *psum = nullptr, *kt = nullptr;
  float *k = nullptr, *vt = nullptr, *block = nullptr, *ds_pairs = nullptr;
  float* row_dots = nullptr;
  if (!CarveTaskScratch(c, bk, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        q = carve.Take(mrp * c.hp);
        dout = carve.Take(mrp * c.hvp);
        dq = carve.Take(mrp * c.hp);
        s = carve.Take(mrp * bkp);
        dp = carve.Take(mrp * bkp);
        th = carve.Take(max_rows * bkp);
        lse = carve.Take(max_rows);
        delta = carve.Take(max_rows);
        psum = carve.Take(max_rows);
        kt = carve.Take(c.hp * bkp);
        k = carve.Take(bk * c.hp);
        vt = carve.Take(c.hvp * bkp);
        block = carve.Take(kVL * MaxI(c.hp, c.hvp));
        ds_pairs = carve.Take(mrp * bkp / 2);
        row_dots = carve.Take(row_dots_scratch);
      })) {
    return;
  }

  // Rows past q_len: zero gradients, D = 0; dlogits rows are zeroed for the whole tile.
  // Every row's dropout keys.
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t n = kv_head * c.group + g;
      const int64_t row = (b * p.q_len + t) * p.num_heads + n;
      if (HasDropout(p)) {
        const DropoutRowKey key = DropoutRowKeyOf(p, b, n, t);
        job.dropout_keys[2 * row] = key.k0;
        job.dropout_keys[2 * row + 1] = key.k1;
      }
      if (a.dlogits != nullptr) {
        __builtin_memset(a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len, 0,
                         p.kv_len * sizeof(float));
      }
      if (t >= tv1) {
        job.delta[row] = 0.0f;
        job.norm[row] = 0.0f;
        if (a.dq != nullptr) {
          __builtin_memset(Offset(a.dq, p.dtype, row * p.head_dim), 0,
                           p.head_dim * DTypeSize(p.dtype));
        }
      }
    }
  }
  const int64_t num_rows = QueryTileRows(c, kv_head, t0, tv1, rows);
  if (num_rows == 0) return;

  // D = rowsum(dO * O) - dlse, from the rounded output as autodiff of the forward would.
  RowOffsets(rows, num_rows, b, p.q_len, p.num_heads, p.value_dim, offsets);
  const int64_t ld_dout = DotLd(c, p.value_dim);
  PackDotRows(c, a.dout, offsets, num_rows, p.value_dim, 1.0f, dout);
  ZeroPaddingRows(c, dout, num_rows, ld_dout);
  // Rounded like dP = dO V^T: for a one-hot row dP - D is then exactly 0, as it is in the
  // exact gradient (otherwise an ulp here, times the scale, is the gradient).
  RowDots(c, a.out, offsets, num_rows, p.value_dim, dout, ld_dout, block, row_dots, delta);
  for (int64_t r = 0; r < num_rows; ++r) {
    float d = delta[r];
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    if (a.dlse != nullptr) d -= a.dlse[row];
    delta[r] = d;
    job.delta[row] = d;
    lse[r] = FiniteOrInf(a.lse[row]);
  }
  const bool key_pass = a.dk != nullptr && a.dv != nullptr;  // it needs job.norm
  if (a.dq == nullptr && a.dlogits == nullptr && !key_pass) return;

  RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackDotRows(c, p.query, offsets, num_rows, p.head_dim, p.scale, q);
  ZeroPaddingRows(c, q, num_rows, DotLd(c, p.head_dim));
  __builtin_memset(dq, 0, PaddedRows(c, num_rows) * c.hp * sizeof(float));
  for (int64_t r = 0; r < num_rows; ++r) psum[r] = 0.0f;

  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  TileCursor tiles = KeyTilesOf(c, qt);
  TileKind kind;
  for (Tile tile; NextVisibleKeyTile(c, qt, &tiles, &tile, &kind);) {
    const int64_t s0 = tile.start, nk = tile.count, nkp = PaddedInner(c, nk);
    KeyOffsets(s0, nk, kb, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    PackDotColumns(c, p.key, offsets, nk, p.head_dim, 1.0f, kt, nkp, block);
    if (a.dq != nullptr) PackAcrossRows(c, p.key, offsets, nk, p.head_dim, k);
    KeyOffsets(s0, nk, vb, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    PackDotColumns(c, p.value, offsets, nk, p.value_dim, 1.0f, vt, nkp, block);

    LogitsGemm(c, num_rows, nkp, q, kt, nkp, s, nkp);
    TransformLogits<false>(c, b, rows, num_rows, s0, nk, kv_len, kind == TileKind::kFull, tile.mask,
                           s, nkp, has_cap ? th : nullptr);
    ProductGemm(c, num_rows, nkp, p.value_dim, dout, ld_dout, vt, nkp, dp, nkp, false);
    for (int64_t r = 0; r < num_rows; ++r) {
      float* sr = s + r * nkp;
      for (int64_t j = nk; j < nkp; ++j) sr[j] = -kInf;
      const VF lv = Splat(lse[r]);
      VF sum = VF{};
      for (int64_t j = 0; j < nkp; j += kVL) {
        const VF e = Exp(Load(sr + j) - lv);
        Store(sr + j, e);
        sum += e;
      }
      psum[r] += HorizontalSum(sum);
      DropoutLine dropout;
      if (HasDropout(p)) {
        const uint32_t* key =
            job.dropout_keys + 2 * ((b * p.q_len + rows[r].t) * p.num_heads + rows[r].n);
        dropout = DropoutLineOf(p, DropoutRowKey{key[0], key[1]}, s0);
      }
      LogitsGradRow(sr, dp + r * nkp, has_cap ? th + r * nkp : nullptr, nkp, delta[r], nullptr,
                    HasDropout(p) ? &dropout : nullptr, DropoutKeepScale(p));
      if (a.dlogits != nullptr) {
        const int64_t t = rows[r].t, n = rows[r].n;
        float* dst = a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len + s0;
        for (int64_t j = 0; j < nk; ++j) dst[j] = dp[r * nkp + j];
      }
    }
    if (a.dq != nullptr) {
      int64_t ldds;
      const float* ds = ComputedOperand(c, dp, num_rows, nk, nkp, ds_pairs, &ldds);
      ProductGemm(c, num_rows, c.hp, nk, ds, ldds, k, c.hp, dq, c.hp, true);
    }
  }
  // The probabilities above were exp(s - lse) = l' P; divide the results by l'.
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t t = rows[r].t, n = rows[r].n;
    const int64_t row = (b * p.q_len + t) * p.num_heads + n;
    const float l = psum[r];
    // l' = 0: a row that sees nothing (its gradients are 0 already). NaN stays NaN.
    const float inv = l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l);
    job.norm[row] = l > 0.0f ? __builtin_logf(l) : (l == 0.0f ? 0.0f : l);
    if (a.dq != nullptr) {
      StoreRow(p.dtype, dq + r * c.hp, p.head_dim, p.scale * inv,
               Offset(a.dq, p.dtype, row * p.head_dim));
    }
    if (a.dlogits != nullptr && inv != 1.0f) {
      float* dst = a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len;
      for (int64_t j = 0; j < p.kv_len; ++j) dst[j] *= inv;
    }
  }
}

// Pass 2, per block of up to kMaxKeyTilesPerTask key tiles: dK and dV over every query that
// sees them. The block's key tiles go through their query tiles side by side, and a query
// tile that several of them see at once (same start and length) is packed once for all of
// them: the packing of Q and dO (both ways) is paid per block, not per key tile. Each key
// tile still visits exactly its own query tiles in increasing order, with the same products,
// so every dK and dV element is bitwise what a task per key tile computes.
constexpr int64_t kMaxKeyTilesPerTask = 2;

// Key tiles per key-pass task: kMaxKeyTilesPerTask where that still leaves
// kLargeTileMinTasks tasks, else 1. The shape decides, never the thread count (the results
// do not depend on it anyway, see above).
static inline int64_t KeyTilesPerTask(const AttentionProblem& p, int64_t num_k_tiles) {
  const int64_t tasks = p.batch * p.num_kv_heads * CeilDiv(num_k_tiles, kMaxKeyTilesPerTask);
  return tasks >= kLargeTileMinTasks ? kMaxKeyTilesPerTask : 1;
}

static void KeyValueGradTask(void* job_ptr, int64_t task) {
  const BackwardJob& job = *static_cast<const BackwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashBackwardArgs& a = job.args;
  const int64_t bk = c.keys_per_tile, num_k_tiles = CeilDiv(p.kv_len, bk);
  const int64_t per_task = KeyTilesPerTask(p, num_k_tiles);
  const TaskTile tt = TileOfTask(p, task, CeilDiv(num_k_tiles, per_task),
                                 /*costliest_last=*/false);
  const int64_t kv_head = tt.kv_head, b = tt.b;
  const int64_t first_tile = tt.tile * per_task;
  const int64_t num_tiles = MinI(per_task, num_k_tiles - first_tile);
  const int64_t q_len = QueryLength(p, b), kv_len = KeyLength(p, b);
  const int64_t max_rows = c.positions_per_tile * c.group, rp = PaddedInner(c, max_rows);
  const bool has_cap = p.soft_cap > 0.0f;
  AmxTaskTiles amx_tiles(c.mode == ProductMode::kAmxTiles);

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *k = nullptr, *v = nullptr, *dk = nullptr, *dv = nullptr, *st = nullptr;
  float *dpt = nullptr, *tht = nullptr, *qt = nullptr, *dot = nullptr, *qr = nullptr;
  float *dor = nullptr, *lse = nullptr, *delta = nullptr, *norm = nullptr, *block = nullptr;
  float *pairs = nullptr, *kept = nullptr;
  uint32_t* row_keys = nullptr;
  if (!CarveTaskScratch(c, max_rows, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        // Per key tile of the block: K, V packed (left operands) and the dK, dV sums.
        k = carve.Take(num_tiles * bk * c.hp);
        v = carve.Take(num_tiles * bk * c.hvp);
        dk = carve.Take(num_tiles * bk * c.hp);
        dv = carve.Take(num_tiles * bk * c.hvp);
        st = carve.Take(bk * rp);
        dpt = carve.Take(bk * rp);
        tht = carve.Take(bk * rp);
        qt = carve.Take(c.hp * rp);
        dot = carve.Take(c.hvp * rp);
        qr = carve.Take(rp * c.hp);
        dor = carve.Take(rp * c.hvp);
        lse = carve.Take(rp);
        delta = carve.Take(rp);
        norm = carve.Take(rp);
        block = carve.Take(kVL * MaxI(c.hp, c.hvp));
        pairs = carve.Take(bk * rp / 2);
        // Dropout: the kept, scaled probabilities (for dV) and the row keys of the query tile.
        if (HasDropout(p)) {
          kept = carve.Take(bk * rp);
          row_keys = reinterpret_cast<uint32_t*>(carve.Take(2 * rp));
        }
      })) {
    return;
  }

  __builtin_memset(dk, 0, num_tiles * bk * c.hp * sizeof(float));
  __builtin_memset(dv, 0, num_tiles * bk * c.hvp * sizeof(float));
  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  const TokenInfo ti = TokenInfoOf(p, b);
  // Per key tile i of the block: keys [s0, s1), visible up to sv1 (nk of them), its query
  // tiles (cursor) and the next of them not yet visited (pending).
  struct KeyTileState {
    int64_t k_tile, s0, s1, sv1, nk;
    TileCursor cursor;
    Tile next;
    bool pending;
    float *k, *v, *dk, *dv;
  } key_tiles[kMaxKeyTilesPerTask];
  for (int64_t i = 0; i < num_tiles; ++i) {
    KeyTileState& kt = key_tiles[i];
    kt.k_tile = first_tile + i;
    kt.s0 = kt.k_tile * bk;
    kt.s1 = MinI(p.kv_len, kt.s0 + bk);
    kt.sv1 = MaxI(kt.s0, MinI(kt.s1, kv_len));
    kt.nk = kt.sv1 - kt.s0;
    kt.k = k + i * bk * c.hp;
    kt.v = v + i * bk * c.hvp;
    kt.dk = dk + i * bk * c.hp;
    kt.dv = dv + i * bk * c.hvp;
    kt.pending = false;
    if (kt.nk == 0) continue;
    KeyOffsets(kt.s0, kt.nk, kb, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    // Unscaled keys and scaled queries, as in the forward pass: the logits recomputed here
    // are then bitwise those whose lse the forward saved (scaling the keys instead rounds
    // differently, and with logits ~1e4 P = exp(s - lse) was off by ~1e-3 relative).
    PackDotRows(c, p.key, offsets, kt.nk, p.head_dim, 1.0f, kt.k);
    ZeroPaddingRows(c, kt.k, kt.nk, DotLd(c, p.head_dim));
    KeyOffsets(kt.s0, kt.nk, vb, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    PackDotRows(c, p.value, offsets, kt.nk, p.value_dim, 1.0f, kt.v);
    ZeroPaddingRows(c, kt.v, kt.nk, DotLd(c, p.value_dim));
    kt.cursor = QueryTilesOf(c, ti, kv_head, kt.k_tile, kt.s0, kt.sv1, q_len);
    kt.pending = NextTile(&kt.cursor, &kt.next);
  }

  for (;;) {
    // The earliest pending query tile; every key tile pending on the same one shares its
    // packing.
    int64_t t0 = -1, count = 0;
    for (int64_t i = 0; i < num_tiles; ++i) {
      const KeyTileState& kt = key_tiles[i];
      if (kt.pending && (t0 < 0 || kt.next.start < t0)) t0 = kt.next.start, count = kt.next.count;
    }
    if (t0 < 0) break;
    const int64_t t1 = t0 + count;
    int64_t num_rows = 0, nrp = 0;
    bool packed = false;
    for (int64_t i = 0; i < num_tiles; ++i) {
      KeyTileState& kt = key_tiles[i];
      if (!kt.pending || kt.next.start != t0 || kt.next.count != count) continue;
      const Tile tile = kt.next;
      kt.pending = NextTile(&kt.cursor, &kt.next);
      const int64_t s0 = kt.s0, nk = kt.nk;
      const TileKind kind = ClassifyTile(p, ti, t0, t1, s0, kt.sv1, kv_len);
      if (kind == TileKind::kHidden) continue;
      if (!packed) {
        packed = true;
        num_rows = QueryTileRows(c, kv_head, t0, t1, rows);
        nrp = PaddedInner(c, num_rows);
        RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
        PackAcrossRows(c, p.query, offsets, num_rows, p.head_dim, qr);
        PackDotColumns(c, p.query, offsets, num_rows, p.head_dim, p.scale, qt, nrp, block);
        RowOffsets(rows, num_rows, b, p.q_len, p.num_heads, p.value_dim, offsets);
        PackAcrossRows(c, a.dout, offsets, num_rows, p.value_dim, dor);
        PackDotColumns(c, a.dout, offsets, num_rows, p.value_dim, 1.0f, dot, nrp, block);
        for (int64_t r = 0; r < nrp; ++r) {
          if (r < num_rows) {
            const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
            lse[r] = FiniteOrInf(a.lse[row]);
            delta[r] = job.delta[row];
            norm[r] = job.norm[row];
            if (HasDropout(p)) {
              row_keys[r] = job.dropout_keys[2 * row];
              row_keys[rp + r] = job.dropout_keys[2 * row + 1];
            }
          } else {
            lse[r] = kInf;
            delta[r] = 0.0f;
            norm[r] = 0.0f;
            if (HasDropout(p)) row_keys[r] = row_keys[rp + r] = 0;
          }
        }
      }

      LogitsGemm(c, nk, nrp, kt.k, qt, nrp, st, nrp);
      TransformLogits<true>(c, b, rows, num_rows, s0, nk, kv_len, kind == TileKind::kFull,
                            tile.mask, st, nrp, has_cap ? tht : nullptr);
      for (int64_t r = 0; r < nk; ++r) {
        float* sr = st + r * nrp;
        for (int64_t j = 0; j < nrp; j += kVL) {
          Store(sr + j, Exp(Load(sr + j) - Load(lse + j) - Load(norm + j)));
        }
      }
      ProductGemm(c, nk, nrp, p.value_dim, kt.v, DotLd(c, p.value_dim), dot, nrp, dpt, nrp, false);
      // Dropout: one mask for P o Z' (dV) and dP o Z' (dS).
      const float* prob_for_v = st;
      if (HasDropout(p)) {
        DropoutKeyMajor(p, row_keys, row_keys + rp, s0, nk, nrp, DropoutKeepScale(p), st, kept,
                        dpt);
        prob_for_v = kept;
      }
      int64_t lda;
      const float* prob_t = ComputedOperand(c, prob_for_v, nk, num_rows, nrp, pairs, &lda);
      ProductGemm(c, nk, c.hvp, num_rows, prob_t, lda, dor, c.hvp, kt.dv, c.hvp, true);
      for (int64_t r = 0; r < nk; ++r) {
        LogitsGradRow(st + r * nrp, dpt + r * nrp, has_cap ? tht + r * nrp : nullptr, nrp, 0.0f,
                      delta);
      }
      const float* ds_t = ComputedOperand(c, dpt, nk, num_rows, nrp, pairs, &lda);
      ProductGemm(c, nk, c.hp, num_rows, ds_t, lda, qr, c.hp, kt.dk, c.hp, true);
    }
  }
  for (int64_t i = 0; i < num_tiles; ++i) {
    const KeyTileState& kt = key_tiles[i];
    for (int64_t j = 0; j < kt.s1 - kt.s0; ++j) {
      const int64_t row = (b * p.kv_len + kt.s0 + j) * p.num_kv_heads + kv_head;
      StoreRow(p.dtype, kt.dk + j * c.hp, p.head_dim, p.scale,
               Offset(a.dk, p.dtype, row * p.head_dim));
      StoreRow(p.dtype, kt.dv + j * c.hvp, p.value_dim, 1.0f,
               Offset(a.dv, p.dtype, row * p.value_dim));
    }
  }
}

// Returns the bytes of memory that could not be allocated (0: none, the gradients are
// written).
static int64_t RunBackward(const AttentionProblem& p, const BlockSparseTables* sparse,
                           ProductMode bf16_mode, const FlashBackwardArgs& args,
                           const Parallel& parallel) {
  BackwardJob job{ContextFor(p, sparse, bf16_mode), args, nullptr, nullptr, nullptr};
  const int64_t row_bytes = MaxI(p.batch * p.q_len * p.num_heads, 1) * sizeof(float);
  job.delta = static_cast<float*>(__builtin_malloc(row_bytes));
  job.norm = static_cast<float*>(__builtin_malloc(row_bytes));
  if (HasDropout(p)) job.dropout_keys = static_cast<uint32_t*>(__builtin_malloc(2 * row_bytes));
  if (job.delta == nullptr || job.norm == nullptr ||
      (HasDropout(p) && job.dropout_keys == nullptr)) {
    __builtin_free(job.delta);
    __builtin_free(job.norm);
    __builtin_free(job.dropout_keys);
    return row_bytes;
  }
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, QueryGradTask, &job);
  if (args.dk != nullptr && args.dv != nullptr && job.c.scratch_failed == 0) {
    const int64_t k_tiles = CeilDiv(p.kv_len, job.c.keys_per_tile);
    const int64_t blocks = CeilDiv(k_tiles, KeyTilesPerTask(p, k_tiles));
    parallel.For(p.batch * p.num_kv_heads * blocks, KeyValueGradTask, &job);
  }
  __builtin_free(job.delta);
  __builtin_free(job.norm);
  __builtin_free(job.dropout_keys);
  return job.c.scratch_failed;
}

template <ProductMode kBF16Mode>
static int64_t BackwardImpl(const AttentionProblem& p, const FlashBackwardArgs& args,
                            const Parallel& parallel) {
  return RunBackward(p, nullptr, kBF16Mode, args, parallel);
}
