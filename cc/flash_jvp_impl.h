// Forward-mode derivative of flash attention for one instruction set (see simd.h for how this
// file is included). Given the forward's out and lse, and tangents dQ, dK, dV (and a bias
// tangent), per query row i:
//   dS = d(logits) = scale (dQ K^T + Q dK^T) + dbias, times 1 - tanh^2 under a soft cap
//   c_i = sum_j P_ij dS_ij                           (the tangent of lse)
//   dO_i = sum_j P_ij dS_ij V_j + sum_j P_ij dV_j - c_i O_i
// with P = exp(S - lse) recomputed as in the backward's first pass. The map is linear in the
// tangents; its transpose is the backward pass (flash_backward_impl.h), which is how reverse
// mode runs. Products are float32 whatever the inputs (the tangent is rarely the hot path).
#pragma once
#include "flash_logits.h"
#include "flash_products.h"
#include "flash_tiles.h"
#include "online_softmax.h"

struct JvpJob {
  FlashContext c;
  FlashTangents tangents;
  int64_t dbias_strides[4] = {0, 0, 0, 0};
  const void* out;
  const float* lse;
  FlashJvpResult res;
};

static void JvpTask(void* job_ptr, int64_t task) {
  const JvpJob& job = *static_cast<const JvpJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashTangents& tg = job.tangents;
  const QueryTileTask qt = QueryTileOfTask(c, task);
  const int64_t kv_head = qt.kv_head, b = qt.b, t0 = qt.t0, t1 = qt.t1, tv1 = qt.tv1;
  const int64_t kv_len = qt.kv_len, max_rows = qt.max_rows;
  const int64_t bk = kKeysPerTile, bkp = RoundUp(bk, kVL);
  const bool has_cap = p.soft_cap > 0.0f;

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *q = nullptr, *dq = nullptr, *acc = nullptr, *s = nullptr, *ds = nullptr;
  float *th = nullptr, *weights = nullptr, *lse = nullptr, *psum = nullptr, *csum = nullptr;
  float *kt = nullptr, *dkt = nullptr, *values = nullptr, *block = nullptr;
  float* dbias_row = nullptr;
  if (!CarveTaskScratch(c, bk, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        q = carve.Take(max_rows * c.hp);
        dq = carve.Take(max_rows * c.hp);
        acc = carve.Take(max_rows * c.hvp);
        s = carve.Take(max_rows * bkp);
        ds = carve.Take(max_rows * bkp);
        th = carve.Take(max_rows * bkp);
        weights = carve.Take(max_rows * 2 * bkp);  // [P dS | P] per row
        lse = carve.Take(max_rows);
        psum = carve.Take(max_rows);
        csum = carve.Take(max_rows);
        kt = carve.Take(c.hp * bkp);
        dkt = carve.Take(c.hp * bkp);
        values = carve.Take(2 * bkp * c.hvp);  // [V; dV], keys padded to bkp
        block = carve.Take(kVL * MaxI(c.hp, c.hvp));
        dbias_row = carve.Take(bkp);
      })) {
    return;
  }

  // Rows past the query length (and rows that see nothing) have zero tangents.
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t row = (b * p.q_len + t) * p.num_heads + kv_head * c.group + g;
      __builtin_memset(Offset(job.res.dout, p.dtype, row * p.value_dim), 0,
                       p.value_dim * DTypeSize(p.dtype));
      job.res.dlse[row] = 0.0f;
    }
  }
  const int64_t num_rows = QueryTileRows(c, kv_head, t0, tv1, rows);
  if (num_rows == 0) return;

  RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackRows(p.dtype, p.query, offsets, num_rows, p.head_dim, p.scale, q, c.hp);
  RowOffsets(rows, num_rows, b % tg.dq_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackRows(p.dtype, tg.dq, offsets, num_rows, p.head_dim, p.scale, dq, c.hp);
  for (int64_t r = 0; r < num_rows; ++r) {
    lse[r] = FiniteOrInf(job.lse[(b * p.q_len + rows[r].t) * p.num_heads + rows[r].n]);
    psum[r] = 0.0f;
    csum[r] = 0.0f;
  }
  __builtin_memset(acc, 0, num_rows * c.hvp * sizeof(float));
  const VI lane = LaneIndices();

  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  TileCursor tiles = KeyTilesOf(c, qt);
  TileKind kind;
  for (Tile tile; NextVisibleKeyTile(c, qt, &tiles, &tile, &kind);) {
    const int64_t s0 = tile.start, nk = tile.count, nkp = RoundUp(nk, kVL);
    KeyOffsets(s0, nk, kb, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    PackColumns(p.dtype, p.key, offsets, nk, p.head_dim, 1.0f, kt, nkp, block);
    KeyOffsets(s0, nk, b % tg.dk_batch, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    PackColumns(p.dtype, tg.dk, offsets, nk, p.head_dim, 1.0f, dkt, nkp, block);
    KeyOffsets(s0, nk, vb, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    PackRows(p.dtype, p.value, offsets, nk, p.value_dim, 1.0f, values, c.hvp);
    KeyOffsets(s0, nk, b % tg.dv_batch, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    float* dvalues = values + nkp * c.hvp;
    PackRows(p.dtype, tg.dv, offsets, nk, p.value_dim, 1.0f, dvalues, c.hvp);
    // Padding keys have zero weights, but 0 * NaN is NaN: zero their rows too.
    __builtin_memset(values + nk * c.hvp, 0, (nkp - nk) * c.hvp * sizeof(float));
    __builtin_memset(dvalues + nk * c.hvp, 0, (nkp - nk) * c.hvp * sizeof(float));

    Gemm(num_rows, nkp, p.head_dim, q, c.hp, kt, nkp, s, nkp, false);
    TransformLogits<false>(c, b, rows, num_rows, s0, nk, kv_len, kind == TileKind::kFull, tile.mask,
                           s, nkp, has_cap ? th : nullptr);
    Gemm(num_rows, nkp, p.head_dim, dq, c.hp, kt, nkp, ds, nkp, false);
    Gemm(num_rows, nkp, p.head_dim, q, c.hp, dkt, nkp, ds, nkp, true);
    if (tg.dbias.data != nullptr) {
      for (int64_t r = 0; r < num_rows; ++r) {
        LoadBroadcastRow(tg.dbias, job.dbias_strides, b, rows[r].n, rows[r].t, s0, nk, dbias_row);
        for (int64_t j = 0; j < nk; ++j) ds[r * nkp + j] += dbias_row[j];
      }
    }
    for (int64_t r = 0; r < num_rows; ++r) {
      float* sr = s + r * nkp;
      float* dsr = ds + r * nkp;
      float* w = weights + r * 2 * nkp;
      const VF lv = Splat(lse[r]);
      VF p_sum = VF{}, c_sum = VF{};
      for (int64_t j = 0; j < nkp; j += kVL) {
        const VI inside = lane + static_cast<int32_t>(j) < static_cast<int32_t>(nk);
        const VF prob = inside ? Exp(Load(sr + j) - lv) : VF{};
        VF d = Load(dsr + j);
        if (has_cap) {
          const VF t = Load(th + r * nkp + j);
          d = d * (1.0f - t * t);
        }
        // Masked logits have P = 0 and contribute nothing, whatever their tangent holds.
        const VF weighted = prob > 0.0f ? prob * d : VF{};
        Store(w + j, weighted);
        Store(w + nkp + j, prob);
        p_sum += prob;
        c_sum += weighted;
      }
      psum[r] += HorizontalSum(p_sum);
      csum[r] += HorizontalSum(c_sum);
    }
    // acc += [P dS | P] [V; dV]
    Gemm(num_rows, c.hvp, 2 * nkp, weights, 2 * nkp, values, c.hvp, acc, c.hvp, true);
  }

  float* out_row = block;
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    const float l = psum[r];
    // l = 0: the row sees nothing (tangent 0, written above). NaN stays NaN.
    if (l == 0.0f) continue;
    const float inv = 1.0f / l, dlse = csum[r] * inv;
    LoadRow(p.dtype, Offset(job.out, p.dtype, row * p.value_dim), p.value_dim, 1.0f, out_row);
    for (int64_t h = 0; h < p.value_dim; ++h) {
      out_row[h] = acc[r * c.hvp + h] * inv - dlse * out_row[h];
    }
    StoreRow(p.dtype, out_row, p.value_dim, 1.0f, Offset(job.res.dout, p.dtype, row * p.value_dim));
    job.res.dlse[row] = dlse;
  }
}

// Returns the bytes of scratch memory that could not be allocated (0: none, the tangents are
// written).
static int64_t RunJvp(const AttentionProblem& p, const BlockSparseTables* sparse,
                      const FlashTangents& tangents, const void* out, const float* lse,
                      const FlashJvpResult& res, const Parallel& parallel) {
  JvpJob job;
  job.c = ContextFor(p, sparse, ProductMode::kFloat32);
  job.tangents = tangents;
  StridesOf(tangents.dbias, job.dbias_strides);
  job.out = out;
  job.lse = lse;
  job.res = res;
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, JvpTask, &job);
  return job.c.scratch_failed;
}

static int64_t JvpImpl(const AttentionProblem& p, const FlashTangents& tangents, const void* out,
                       const float* lse, const FlashJvpResult& res, const Parallel& parallel) {
  return RunJvp(p, nullptr, tangents, out, lse, res, parallel);
}
