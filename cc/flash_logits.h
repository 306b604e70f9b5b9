// From products to logits, for one instruction set (see simd.h for how this file is
// included): bias, ALiBi, soft cap, the analytic, position, segment and dense masks and a
// block-sparse tile's element mask applied to a tile of scaled logits, in either layout
// (query-major for the forward and the query pass, key-major for the key pass), so that
// the backward recomputes the forward's logits bitwise.
#pragma once
#include "flash_context.h"
#include "flash_tiles.h"

// Sets the logits of a tile to -inf where its element mask is zero, a vector at a time. The
// mask and the logits share their layout (rows x keys, or keys x rows with kKeysMajor);
// mask lines are kKeysPerTile or rows_padded long, whole vectors, so reading up to the
// rounded-up length stays inside the mask and inside the logits' padding.
typedef uint8_t VB __attribute__((vector_size(kVL)));
template <bool kKeysMajor>
static void ApplyTileMask(const FlashContext& c, const uint8_t* tile_mask, int64_t num_rows,
                          int64_t num_keys, float* x, int64_t ld) {
  static_assert(kKeysPerTile % kVL == 0, "mask rows must hold whole vectors");
  const VF minus_inf = Splat(-kInf);
  const int64_t lines = kKeysMajor ? num_keys : num_rows;
  const int64_t length = kKeysMajor ? num_rows : num_keys;
  const int64_t mask_ld = kKeysMajor ? c.rows_padded : kKeysPerTile;
  for (int64_t i = 0; i < lines; ++i) {
    const uint8_t* mi = tile_mask + i * mask_ld;
    float* xi = x + i * ld;
    for (int64_t j = 0; j < length; j += kVL) {
      VB mb;
      __builtin_memcpy(&mb, mi + j, sizeof(mb));
      const VI visible = __builtin_convertvector(mb, VI) != 0;
      Store(xi + j, visible ? Load(xi + j) : minus_inf);
    }
  }
}

// Elements [s0, s0 + length) of row (b, n, t) of a [B, N, T, S]-broadcastable float operand,
// as float32.
static void LoadBroadcastRow(const Broadcast4& x, const int64_t* strides, int64_t b, int64_t n,
                             int64_t t, int64_t s0, int64_t length, float* dst) {
  const int64_t at = BroadcastOffset(x, strides, b, n, t);
  if (strides[3] != 0) {
    LoadRow(x.dtype, Offset(x.data, x.dtype, at + s0), length, 1.0f, dst);
  } else {
    const float v = LoadOne(x.dtype, x.data, at);
    for (int64_t j = 0; j < length; ++j) dst[j] = v;
  }
}

// Applies bias, ALiBi, soft cap and the masks to a tile of scaled logits. Stored element
// (i, j) is x[i * ld + j]; it is query row rows[i] and key s0 + j, or with kKeysMajor key
// s0 + i and query row rows[j]. Masked logits become -inf. With a soft cap, tanh(logit / cap)
// is kept in tanh_out (same layout) for the backward pass. tile_mask (or nullptr) is the
// element mask of a partial block-sparse tile, in the layout of the logits (see Tile).
// analytic_full: ClassifyTile found the tile fully visible (no causal, window, length,
// position or segment mask work).
//
// Line by line (a row of x): the bias and mask entries of the line are gathered into line
// buffers at their own dtype, and the positions and segment ids along the line (the same for
// every line of the tile) once per tile; the causal mask and window of the line become a range
// [lo, hi) of positions along it; then bias, ALiBi, soft cap and every mask are applied a
// vector at a time, up to the line's padded length (ld, whole vectors; padding elements are
// transformed too and stay harmless). The two layouts compute every logit with the same
// operations, so the backward passes reproduce the forward's logits bitwise.
template <bool kKeysMajor>
static void TransformLogits(const FlashContext& c, int64_t b, const RowInfo* rows, int64_t num_rows,
                            int64_t s0, int64_t num_keys, int64_t kv_len, bool analytic_full,
                            const uint8_t* tile_mask, float* x, int64_t ld, float* tanh_out) {
  const AttentionProblem& p = *c.p;
  const bool has_bias = p.bias.data != nullptr, has_mask = p.mask.data != nullptr;
  const bool has_cap = p.soft_cap > 0.0f, has_alibi = p.alibi_slopes != nullptr;
  if (!has_bias && !has_mask && !has_cap && !has_alibi && analytic_full) {
    if (tile_mask != nullptr) ApplyTileMask<kKeysMajor>(c, tile_mask, num_rows, num_keys, x, ld);
    return;
  }
  const TokenInfo ti = TokenInfoOf(p, b);
  const bool has_segments = ti.q_seg != nullptr;
  const int64_t lines = kKeysMajor ? num_keys : num_rows;
  const int64_t length = kKeysMajor ? num_rows : num_keys;
  const int64_t padded = RoundUp(length, kVL);  // <= ld
  const int64_t tile_mask_ld = kKeysMajor ? c.rows_padded : kKeysPerTile;
  const float cap = p.soft_cap, inv_cap = has_cap ? 1.0f / p.soft_cap : 0.0f;
  const uint8_t* mask = static_cast<const uint8_t*>(p.mask.data);

  // Line buffers: bias values (floats), mask bytes, ALiBi terms (floats), and along the
  // line's axis: positions (key-major the rows' query positions, query-major the keys'),
  // segment ids and (key-major) the rows' slopes.
  // Reserved by the task (CarveTaskScratch, for its longest line).
  float* scratch = tls_line_scratch.Reserved(LineScratchFloats(length));
  float* bias_line = scratch;
  uint8_t* mask_line = reinterpret_cast<uint8_t*>(scratch + padded + 16);
  int32_t* pos_line = reinterpret_cast<int32_t*>(scratch + 2 * padded + 32);
  int32_t* seg_line = reinterpret_cast<int32_t*>(scratch + 3 * padded + 48);
  float* alibi_line = scratch + 4 * padded + 64;
  float* slope_line = scratch + 5 * padded + 80;
  // Positions along the line: explicit ones when the masks or ALiBi compare positions (the
  // query-major masks otherwise use lane indices).
  const bool positions_along = kKeysMajor || ti.by_position || has_alibi;
  if (kKeysMajor) {
    for (int64_t r = 0; r < padded; ++r) {
      const bool real = r < num_rows;
      pos_line[r] = real ? ti.QueryPosition(rows[r].t) : -1;
      if (has_segments) seg_line[r] = real ? ti.q_seg[rows[r].t] : 0;
      if (has_alibi) slope_line[r] = real ? ti.slopes[rows[r].n] : 0.0f;
    }
  } else {
    for (int64_t j = 0; j < padded; ++j) {
      const bool real = j < num_keys;
      if (positions_along) pos_line[j] = real ? ti.KeyPosition(s0 + j) : 0;
      if (has_segments) seg_line[j] = real ? ti.kv_seg[s0 + j] : 0;
    }
  }
  const VI lane = LaneIndices();
  const VF minus_inf = Splat(-kInf);
  const int64_t unbounded = int64_t{1} << 62;

  for (int64_t i = 0; i < lines; ++i) {
    float* xl = x + i * ld;
    float* thl = tanh_out != nullptr ? tanh_out + i * ld : nullptr;
    // Visible positions [lo, hi) along the line: key offsets j from s0 (query-major, by
    // index), key positions (query-major, by position) or query positions (key-major).
    // index_hi: query-major by position, keys j >= index_hi are past the key length.
    int64_t lo = 0, hi = unbounded, index_hi = unbounded;
    // This line's own position (query-major the query's, key-major the key's).
    int32_t line_pos = 0;
    if (!kKeysMajor) {
      const int64_t t = rows[i].t;
      line_pos = ti.QueryPosition(t);
      const int64_t shift = ti.by_position ? 0 : s0;  // lane offsets by index
      const int64_t qp = line_pos;
      lo = p.window_left >= 0 ? qp - p.window_left - shift : -unbounded;
      if (p.causal) hi = MinI(hi, qp + 1 - shift);
      if (p.window_right >= 0) hi = MinI(hi, qp + p.window_right + 1 - shift);
      if (ti.by_position) {
        index_hi = kv_len - s0;
      } else {
        hi = MinI(hi, kv_len - s0);
      }
    } else {
      const int64_t s = s0 + i;
      line_pos = ti.KeyPosition(s);
      const int64_t kp = line_pos;
      lo = p.causal ? kp : -unbounded;
      if (p.window_right >= 0) lo = MaxI(lo, kp - p.window_right);
      if (p.window_left >= 0) hi = kp + p.window_left + 1;
      if (s >= kv_len) hi = lo;
    }
    const VI lo_v = VI{} + ClampToI32(lo), hi_v = VI{} + ClampToI32(hi);
    const VI index_hi_v = VI{} + ClampToI32(index_hi);
    const VI line_seg_v =
        VI{} + (has_segments ? (kKeysMajor ? ti.kv_seg[s0 + i] : ti.q_seg[rows[i].t]) : 0);

    if (has_bias || has_mask) {
      const int64_t n = kKeysMajor ? 0 : rows[i].n, t = kKeysMajor ? 0 : rows[i].t;
      if (has_bias && !kKeysMajor) {
        LoadBroadcastRow(p.bias, c.bias_strides, b, n, t, s0, length, bias_line);
      }
      if (has_mask && !kKeysMajor) {
        const int64_t at = BroadcastOffset(p.mask, c.mask_strides, b, n, t);
        if (c.mask_strides[3] != 0) {
          __builtin_memcpy(mask_line, mask + at + s0, length);
        } else {
          __builtin_memset(mask_line, mask[at], length);
        }
      }
      if (kKeysMajor) {
        const int64_t s = s0 + i;
        for (int64_t r = 0; r < length; ++r) {
          if (has_bias) {
            bias_line[r] =
                LoadOne(p.bias.dtype, p.bias.data,
                        BroadcastOffset(p.bias, c.bias_strides, b, rows[r].n, rows[r].t) +
                            s * c.bias_strides[3]);
          }
          if (has_mask) {
            mask_line[r] = mask[BroadcastOffset(p.mask, c.mask_strides, b, rows[r].n, rows[r].t) +
                                s * c.mask_strides[3]];
          }
        }
      }
      for (int64_t j = length; j < padded; ++j) {
        bias_line[j] = 0.0f;
        mask_line[j] = 0;
      }
    }
    if (has_alibi) {
      // slope * |position_t - position_s|, stored apart from its use so that no layout
      // contracts it into a fused multiply-add with the logit (the backward must match).
      // The distance in unsigned arithmetic: positions within +-2^30 differ by up to 2^31.
      typedef uint32_t VU __attribute__((vector_size(kVL * 4)));
      const VU line_pos_v = VU{} + static_cast<uint32_t>(line_pos);
      const VF line_slope = Splat(kKeysMajor ? 0.0f : ti.slopes[rows[i].n]);
      for (int64_t j = 0; j < padded; j += kVL) {
        VU d;
        __builtin_memcpy(&d, pos_line + j, sizeof(d));
        d = d - line_pos_v;
        d = (VI)d < 0 ? -d : d;
        const VF slope = kKeysMajor ? Load(slope_line + j) : line_slope;
        Store(alibi_line + j, slope * __builtin_convertvector(d, VF));
      }
    }

    const uint8_t* tile_line = tile_mask != nullptr ? tile_mask + i * tile_mask_ld : nullptr;
    for (int64_t j = 0; j < padded; j += kVL) {
      VF v = Load(xl + j);
      if (has_bias) v += Load(bias_line + j);
      if (has_alibi) v -= Load(alibi_line + j);
      VI visible = VI{} - 1;
      if (!analytic_full) {
        VI position;
        if (kKeysMajor || ti.by_position) {
          __builtin_memcpy(&position, pos_line + j, sizeof(position));
        } else {
          position = lane + static_cast<int32_t>(j);
        }
        visible = (position >= lo_v) & (position < hi_v);
        if (!kKeysMajor && ti.by_position) {
          visible &= (lane + static_cast<int32_t>(j)) < index_hi_v;
        }
        if (has_segments) {
          VI seg;
          __builtin_memcpy(&seg, seg_line + j, sizeof(seg));
          visible &= seg == line_seg_v;
        }
      }
      if (has_mask) {
        VB mb;
        __builtin_memcpy(&mb, mask_line + j, sizeof(mb));
        visible &= __builtin_convertvector(mb, VI) != 0;
      }
      if (tile_line != nullptr) {
        VB mb;
        __builtin_memcpy(&mb, tile_line + j, sizeof(mb));
        visible &= __builtin_convertvector(mb, VI) != 0;
      }
      if (has_cap) {
        VF th;
        v = SoftCap(v, inv_cap, cap, &th);
        // 0 where masked: the backward multiplies by 1 - tanh^2, and a NaN or inf from a
        // masked bias entry must not turn the (zero) gradient there into NaN.
        if (thl != nullptr) Store(thl + j, visible != 0 ? th : VF{});
      }
      Store(xl + j, visible != 0 ? v : minus_inf);
    }
  }
}
