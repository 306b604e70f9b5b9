// XLA FFI handlers: decode buffers and attributes, re-check what the kernels rely on, run them
// on XLA's intra-op thread pool. The only file that includes the XLA FFI headers.
#include "ffi.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxattn {
namespace {

using S32Buffer = ffi::Buffer<ffi::S32>;
using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::Result<ffi::Buffer<ffi::F32>>;

// Parallel loops on XLA's intra-op pool (see RunOnPool for why this cannot deadlock).
class XlaParallel final : public Parallel {
 public:
  explicit XlaParallel(ffi::ThreadPool pool) : pool_(pool) {}
  int64_t num_threads() const override {
    const int64_t n = pool_.num_threads();
    return n > 0 ? n : 1;
  }
  void For(int64_t num_tasks, TaskFn fn, void* context) const override {
    RunOnPool(num_tasks, fn, context, num_threads(), &XlaParallel::Schedule,
              const_cast<ffi::ThreadPool*>(&pool_));
  }

 private:
  static void Schedule(void* scheduler, void (*work)(void*), void* work_context) {
    static_cast<ffi::ThreadPool*>(scheduler)->Schedule([work, work_context] {
      work(work_context);
    });
  }
  ffi::ThreadPool pool_;
};

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error::InvalidArgument("jaxattn: " + message);
}

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

bool ToDType(ffi::DataType type, DType* dtype) {
  switch (type) {
    case ffi::DataType::F32: *dtype = DType::kF32; return true;
    case ffi::DataType::BF16: *dtype = DType::kBF16; return true;
    case ffi::DataType::F16: *dtype = DType::kF16; return true;
    default: return false;
  }
}

// An optional [B', N', T', S'] operand; zero elements means absent.
ffi::Error DecodeBroadcast(const ffi::AnyBuffer& buffer, const char* name, Broadcast4* out) {
  if (buffer.element_count() == 0) return ffi::Error::Success();
  const auto dims = buffer.dimensions();
  if (dims.size() != 4) {
    return InvalidArgument(std::string(name) + " must have rank 4, got " + ShapeString(dims));
  }
  out->data = buffer.untyped_data();
  for (int i = 0; i < 4; ++i) out->dims[i] = dims[i];
  return ffi::Error::Success();
}

// Token positions, segment ids and ALiBi slopes (each 0 elements: absent).
struct TokenOperands {
  const S32Buffer& q_positions;   // [Bp, T]
  const S32Buffer& kv_positions;  // [Bp, S]
  const S32Buffer& q_segments;    // [Bs, T]
  const S32Buffer& kv_segments;   // [Bs, S]
  const F32Buffer& alibi_slopes;  // [Ba, N]
};

struct ProblemOperands {
  const ffi::AnyBuffer& query;
  const ffi::AnyBuffer& key;
  const ffi::AnyBuffer& value;
  const ffi::AnyBuffer& bias;
  const ffi::AnyBuffer& mask;
  const S32Buffer& q_lengths;
  const S32Buffer& kv_lengths;
  const TokenOperands* tokens = nullptr;
};

// Points p at the present token operands after checking their shapes against it.
ffi::Error DecodeTokens(const TokenOperands& in, AttentionProblem* p) {
  const auto rows = [](const S32Buffer& x, const char* name, int64_t len, const int32_t** data,
                       int64_t* batch) -> ffi::Error {
    if (x.element_count() == 0) return ffi::Error::Success();
    const auto d = x.dimensions();
    if (d.size() != 2 || d[1] != len) {
      return InvalidArgument(std::string(name) + " must have shape [B, " + std::to_string(len) +
                             "], got " + ShapeString(d));
    }
    *data = x.typed_data();
    *batch = d[0];
    return ffi::Error::Success();
  };
  if (auto e = rows(in.q_positions, "query_positions", p->q_len, &p->q_positions,
                    &p->q_positions_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.kv_positions, "key_value_positions", p->kv_len, &p->kv_positions,
                    &p->kv_positions_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.q_segments, "query_segment_ids", p->q_len, &p->q_segments,
                    &p->q_segments_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.kv_segments, "key_value_segment_ids", p->kv_len, &p->kv_segments,
                    &p->kv_segments_batch);
      e.failure()) {
    return e;
  }
  if (in.alibi_slopes.element_count() != 0) {
    const auto d = in.alibi_slopes.dimensions();
    if (d.size() != 2 || d[1] != p->num_heads) {
      return InvalidArgument("alibi_slopes must have shape [B, " + std::to_string(p->num_heads) +
                             "], got " + ShapeString(d));
    }
    p->alibi_slopes = in.alibi_slopes.typed_data();
    p->alibi_batch = d[0];
  }
  return ffi::Error::Success();
}

struct ProblemAttrs {
  float scale;
  float soft_cap;
  bool is_causal;
  int64_t window_left;
  int64_t window_right;
};

// Query, key and value of a problem with an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error DecodeQueryKeyValue(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                               const ffi::AnyBuffer& value, int64_t batch,
                               AttentionProblem* p) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4) {
    return InvalidArgument("query, key and value must have rank 4, got " + ShapeString(q) +
                           ", " + ShapeString(k) + ", " + ShapeString(v));
  }
  if (!ToDType(query.element_type(), &p->dtype) ||
      key.element_type() != query.element_type() ||
      value.element_type() != query.element_type()) {
    return InvalidArgument("query, key and value must share one of float32, bfloat16, float16");
  }
  if (k[1] != v[1] || k[2] != v[2] || q[3] != k[3]) {
    return InvalidArgument("inconsistent shapes: query " + ShapeString(q) + ", key " +
                           ShapeString(k) + ", value " + ShapeString(v));
  }
  p->batch = batch;
  p->q_batch = q[0];
  p->q_len = q[1];
  p->num_heads = q[2];
  p->head_dim = q[3];
  p->kv_batch = k[0];
  p->value_batch = v[0];
  p->kv_len = k[1];
  p->num_kv_heads = k[2];
  p->value_dim = v[3];
  p->query = query.untyped_data();
  p->key = key.untyped_data();
  p->value = value.untyped_data();
  return ffi::Error::Success();
}

// Builds and checks the problem for an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error DecodeProblem(const ProblemOperands& in, const ProblemAttrs& attrs, int64_t batch,
                         AttentionProblem* p) {
  if (auto e = DecodeQueryKeyValue(in.query, in.key, in.value, batch, p); e.failure()) {
    return e;
  }
  if (auto e = DecodeBroadcast(in.bias, "bias", &p->bias); e.failure()) return e;
  if (auto e = DecodeBroadcast(in.mask, "mask", &p->mask); e.failure()) return e;
  if (p->bias.data != nullptr && !ToDType(in.bias.element_type(), &p->bias.dtype)) {
    return InvalidArgument("bias must be float32, bfloat16 or float16");
  }
  if (p->mask.data != nullptr && in.mask.element_type() != ffi::DataType::PRED &&
      in.mask.element_type() != ffi::DataType::U8) {
    return InvalidArgument("mask must be boolean");
  }
  if (in.q_lengths.element_count() > 0) {
    p->q_lengths = in.q_lengths.typed_data();
    p->q_lengths_batch = in.q_lengths.element_count();
  }
  if (in.kv_lengths.element_count() > 0) {
    p->kv_lengths = in.kv_lengths.typed_data();
    p->kv_lengths_batch = in.kv_lengths.element_count();
  }
  if (in.tokens != nullptr) {
    if (auto e = DecodeTokens(*in.tokens, p); e.failure()) return e;
  }
  p->scale = attrs.scale;
  p->soft_cap = attrs.soft_cap;
  p->causal = attrs.is_causal;
  // A window side wider than the sequence bounds nothing: clamp so that the kernels'
  // position + window arithmetic cannot overflow for any attribute value (-1: unbounded).
  // Positions (clamped to +-2^30 by the kernels) are at most 2^31 apart.
  const bool by_position = p->q_positions != nullptr || p->kv_positions != nullptr;
  const int64_t left_max = by_position ? int64_t{1} << 31 : p->q_len;
  const int64_t right_max = by_position ? int64_t{1} << 31 : p->kv_len;
  p->window_left = attrs.window_left < 0 ? -1 : std::min<int64_t>(attrs.window_left, left_max);
  p->window_right =
      attrs.window_right < 0 ? -1 : std::min<int64_t>(attrs.window_right, right_max);
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

bool HasShape(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t e : expected) {
    if (dims[i++] != e) return false;
  }
  return true;
}

ffi::Error FlashForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                            ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                            S32Buffer q_lengths, S32Buffer kv_lengths, S32Buffer q_positions,
                            S32Buffer kv_positions, S32Buffer q_segments,
                            S32Buffer kv_segments, F32Buffer alibi_slopes,
                            ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                            float soft_cap, bool is_causal, int64_t window_left,
                            int64_t window_right) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  if (auto e = DecodeProblem(in, attrs, od[0], &p); e.failure()) return e;
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  FlashForward(p, FlashForwardResult{out->untyped_data(), lse->typed_data()},
               XlaParallel(pool));
  return ffi::Error::Success();
}

// Checks what every backward target takes besides the problem (the forward's out and lse,
// the cotangents dout and dlse) and the gradients it writes (nullptr: not written), and
// points args at them.
ffi::Error DecodeBackwardArgs(const AttentionProblem& p, ffi::DataType dtype,
                              const ffi::AnyBuffer& out, const F32Buffer& lse,
                              const ffi::AnyBuffer& dout, const F32Buffer& dlse,
                              ffi::AnyBuffer* dq, ffi::AnyBuffer* dk, ffi::AnyBuffer* dv,
                              ffi::Buffer<ffi::F32>* dlogits, FlashBackwardArgs* args,
                              const char* target = "backward") {
  const int64_t B = p.batch, T = p.q_len, N = p.num_heads, S = p.kv_len;
  const auto is = [dtype](const ffi::AnyBuffer* x, std::initializer_list<int64_t> shape) {
    return x == nullptr || (x->element_type() == dtype && HasShape(x->dimensions(), shape));
  };
  if (!is(&out, {B, T, N, p.value_dim}) || !is(&dout, {B, T, N, p.value_dim}) ||
      !HasShape(lse.dimensions(), {B, T, N}) ||
      (dlse.element_count() != 0 && !HasShape(dlse.dimensions(), {B, T, N})) ||
      !is(dq, {B, T, N, p.head_dim}) || !is(dk, {B, S, p.num_kv_heads, p.head_dim}) ||
      !is(dv, {B, S, p.num_kv_heads, p.value_dim}) ||
      (dlogits != nullptr && !HasShape(dlogits->dimensions(), {B, N, T, S}))) {
    return InvalidArgument(std::string(target) + " operand shapes do not match the inputs");
  }
  args->out = out.untyped_data();
  args->lse = lse.typed_data();
  args->dout = dout.untyped_data();
  args->dlse = dlse.element_count() ? dlse.typed_data() : nullptr;
  args->dq = dq ? dq->untyped_data() : nullptr;
  args->dk = dk ? dk->untyped_data() : nullptr;
  args->dv = dv ? dv->untyped_data() : nullptr;
  args->dlogits = dlogits ? dlogits->typed_data() : nullptr;
  return ffi::Error::Success();
}

ffi::Error FlashBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                             S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                             F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                             S32Buffer q_positions, S32Buffer kv_positions,
                             S32Buffer q_segments, S32Buffer kv_segments,
                             F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> dq,
                             ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                             float scale, float soft_cap, bool is_causal, int64_t window_left,
                             int64_t window_right) {
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  if (auto e = DecodeProblem(in, attrs, dqd[0], &p); e.failure()) return e;
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq, &*dk,
                                  &*dv, nullptr, &args);
      e.failure()) {
    return e;
  }
  FlashBackward(p, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// d loss / d logits [B, N, T, S] in float32, for the gradient of a bias.
ffi::Error FlashLogitsGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                               S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                               F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                               S32Buffer q_positions, S32Buffer kv_positions,
                               S32Buffer q_segments, S32Buffer kv_segments,
                               F32Buffer alibi_slopes, F32Result dlogits, float scale,
                               float soft_cap, bool is_causal, int64_t window_left,
                               int64_t window_right) {
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  const auto gd = dlogits->dimensions();
  if (gd.size() != 4) return InvalidArgument("dlogits must have rank 4");
  if (auto e = DecodeProblem(in, attrs, gd[0], &p); e.failure()) return e;
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, nullptr,
                                  nullptr, nullptr, &*dlogits, &args, "logits-gradient");
      e.failure()) {
    return e;
  }
  FlashBackward(p, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// Block-sparse tables from their operands: q_indptr [groups * num_q_tiles + 1], q_entries
// [nnz, 2], k_indptr/k_entries the same transposed (or absent: nullptr), masks [M, rows, keys].
ffi::Error DecodeBlockSparse(const AttentionProblem& p, const S32Buffer& q_indptr,
                             const S32Buffer& q_entries, const S32Buffer* k_indptr,
                             const S32Buffer* k_entries, const ffi::AnyBuffer& masks,
                             const ffi::AnyBuffer* masks_t, BlockSparseTables* t) {
  const BlockSparseTiling tiling = BlockSparseTilingFor(p.num_heads / p.num_kv_heads);
  t->num_q_tiles = (p.q_len + tiling.positions - 1) / tiling.positions;
  t->num_k_tiles = (p.kv_len + tiling.keys - 1) / tiling.keys;
  const auto qi = q_indptr.dimensions(), qe = q_entries.dimensions(), md = masks.dimensions();
  if (qi.size() != 1 || (qi[0] - 1) % t->num_q_tiles != 0) {
    return InvalidArgument("block-sparse q_indptr must have groups * " +
                           std::to_string(t->num_q_tiles) + " + 1 entries, got " +
                           ShapeString(qi));
  }
  t->groups = (qi[0] - 1) / t->num_q_tiles;
  if (qe.size() != 2 || qe[1] != 2) {
    return InvalidArgument("block-sparse q_entries must have shape [nnz, 2], got " +
                           ShapeString(qe));
  }
  if (md.size() != 3 || md[1] != tiling.rows || md[2] != tiling.keys ||
      (masks.element_type() != ffi::DataType::PRED && masks.element_type() != ffi::DataType::U8)) {
    return InvalidArgument("block-sparse masks must be bool [M, " + std::to_string(tiling.rows) +
                           ", " + std::to_string(tiling.keys) + "], got " + ShapeString(md));
  }
  t->q_indptr = q_indptr.typed_data();
  t->q_entries = q_entries.typed_data();
  t->q_nnz = qe[0];
  t->masks = static_cast<const uint8_t*>(masks.untyped_data());
  t->num_masks = md[0];
  if (k_indptr != nullptr) {
    const auto ki = k_indptr->dimensions(), ke = k_entries->dimensions();
    if (ki.size() != 1 || ki[0] != t->groups * t->num_k_tiles + 1 || ke.size() != 2 ||
        ke[1] != 2) {
      return InvalidArgument("block-sparse k_indptr/k_entries have the wrong shape: " +
                             ShapeString(ki) + ", " + ShapeString(ke));
    }
    t->k_indptr = k_indptr->typed_data();
    t->k_entries = k_entries->typed_data();
    t->k_nnz = ke[0];
    const auto mt = masks_t->dimensions();
    if (mt.size() != 3 || mt[0] != md[0] || mt[1] != tiling.keys ||
        mt[2] != tiling.rows_padded || masks_t->element_type() != masks.element_type()) {
      return InvalidArgument("block-sparse transposed masks must be bool [M, " +
                             std::to_string(tiling.keys) + ", " +
                             std::to_string(tiling.rows_padded) + "], got " + ShapeString(mt));
    }
    t->masks_t = static_cast<const uint8_t*>(masks_t->untyped_data());
  }
  if (const char* message = ValidateBlockSparse(p, *t)) return InvalidArgument(message);
  return ffi::Error::Success();
}

ffi::Error SparseProblem(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                         const ffi::AnyBuffer& value, int64_t batch, float scale,
                         float soft_cap, const TokenOperands& tokens, AttentionProblem* p) {
  if (auto e = DecodeQueryKeyValue(query, key, value, batch, p); e.failure()) return e;
  if (auto e = DecodeTokens(tokens, p); e.failure()) return e;
  p->scale = scale;
  p->soft_cap = soft_cap;
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

ffi::Error SparseForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer q_indptr, S32Buffer q_entries,
                             ffi::AnyBuffer masks, S32Buffer q_positions,
                             S32Buffer kv_positions, S32Buffer q_segments,
                             S32Buffer kv_segments, F32Buffer alibi_slopes,
                             ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                             float soft_cap) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  AttentionProblem p;
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  if (auto e = SparseProblem(query, key, value, od[0], scale, soft_cap, tokens, &p);
      e.failure()) {
    return e;
  }
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  BlockSparseTables tables;
  if (auto e = DecodeBlockSparse(p, q_indptr, q_entries, nullptr, nullptr, masks, nullptr,
                                 &tables);
      e.failure()) {
    return e;
  }
  BlockSparseForward(p, tables, FlashForwardResult{out->untyped_data(), lse->typed_data()},
                     XlaParallel(pool));
  return ffi::Error::Success();
}

ffi::Error SparseBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                              ffi::AnyBuffer value, ffi::AnyBuffer out, F32Buffer lse,
                              ffi::AnyBuffer dout, F32Buffer dlse, S32Buffer q_indptr,
                              S32Buffer q_entries, S32Buffer k_indptr, S32Buffer k_entries,
                              ffi::AnyBuffer masks, ffi::AnyBuffer masks_t,
                              S32Buffer q_positions, S32Buffer kv_positions,
                              S32Buffer q_segments, S32Buffer kv_segments,
                              F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> dq,
                              ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                              float scale, float soft_cap) {
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  AttentionProblem p;
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  if (auto e = SparseProblem(query, key, value, dqd[0], scale, soft_cap, tokens, &p);
      e.failure()) {
    return e;
  }
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq, &*dk,
                                  &*dv, nullptr, &args);
      e.failure()) {
    return e;
  }
  BlockSparseTables tables;
  if (auto e = DecodeBlockSparse(p, q_indptr, q_entries, &k_indptr, &k_entries, masks,
                                 &masks_t, &tables);
      e.failure()) {
    return e;
  }
  BlockSparseBackward(p, tables, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// Decode: query [Bq,T,N,H]; key/value storage [P, page, K, H|Hv] (a contiguous cache is P = Bk
// pages of page = Smax); block_tables [Bt, max_pages] (nullptr: contiguous); kv_lengths [Bl].
// Decode's optional token operands (0 elements: absent): query_positions [Bp, T],
// key_value_positions [Bp, max_pages * page_size], alibi_slopes [Ba, N].
struct DecodeTokenOperands {
  const S32Buffer& q_positions;
  const S32Buffer& kv_positions;
  const F32Buffer& alibi_slopes;
};

ffi::Error ReadDecodeTokens(const DecodeTokenOperands& in, DecodeAttentionProblem* p) {
  const auto rows = [](const ffi::AnyBuffer::Dimensions d, int64_t len) {
    return d.size() == 2 && d[0] > 0 && d[1] == len;
  };
  const int64_t capacity = p->max_pages * p->page_size;
  if (in.q_positions.element_count() != 0) {
    if (!rows(in.q_positions.dimensions(), p->q_len)) {
      return InvalidArgument("decode: query_positions must have shape [B, " +
                             std::to_string(p->q_len) + "], got " +
                             ShapeString(in.q_positions.dimensions()));
    }
    p->q_positions = in.q_positions.typed_data();
    p->q_positions_batch = in.q_positions.dimensions()[0];
  }
  if (in.kv_positions.element_count() != 0) {
    if (!rows(in.kv_positions.dimensions(), capacity)) {
      return InvalidArgument("decode: key_value_positions must have shape [B, " +
                             std::to_string(capacity) + "], got " +
                             ShapeString(in.kv_positions.dimensions()));
    }
    p->kv_positions = in.kv_positions.typed_data();
    p->kv_positions_batch = in.kv_positions.dimensions()[0];
  }
  if (in.alibi_slopes.element_count() != 0) {
    if (!rows(in.alibi_slopes.dimensions(), p->num_heads)) {
      return InvalidArgument("decode: alibi_slopes must have shape [B, " +
                             std::to_string(p->num_heads) + "], got " +
                             ShapeString(in.alibi_slopes.dimensions()));
    }
    p->alibi_slopes = in.alibi_slopes.typed_data();
    p->alibi_batch = in.alibi_slopes.dimensions()[0];
  }
  return ffi::Error::Success();
}

ffi::Error DecodeRun(ffi::ThreadPool pool, const ffi::AnyBuffer& query,
                     const ffi::AnyBuffer& key, const ffi::AnyBuffer& value,
                     const S32Buffer* block_tables, const S32Buffer& kv_lengths,
                     const DecodeTokenOperands& tokens, ffi::Result<ffi::AnyBuffer>& out,
                     F32Result& lse, float scale, float soft_cap, int64_t window_left) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  const auto od = out->dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || od.size() != 4) {
    return InvalidArgument("decode: query, caches and output must have rank 4, got " +
                           ShapeString(q) + ", " + ShapeString(k) + ", " + ShapeString(v));
  }
  DecodeAttentionProblem p;
  if (!ToDType(query.element_type(), &p.dtype) || key.element_type() != query.element_type() ||
      value.element_type() != query.element_type() ||
      out->element_type() != query.element_type()) {
    return InvalidArgument("decode: query and caches must share one of float32, bfloat16, "
                           "float16");
  }
  if (k[0] != v[0] || k[1] != v[1] || k[2] != v[2] || q[3] != k[3]) {
    return InvalidArgument("decode: inconsistent shapes: query " + ShapeString(q) + ", key " +
                           ShapeString(k) + ", value " + ShapeString(v));
  }
  p.batch = od[0];
  p.q_batch = q[0];
  p.q_len = q[1];
  p.num_heads = q[2];
  p.head_dim = q[3];
  p.num_pages = k[0];
  p.page_size = k[1];
  p.num_kv_heads = k[2];
  p.value_dim = v[3];
  p.query = query.untyped_data();
  p.key = key.untyped_data();
  p.value = value.untyped_data();
  if (block_tables != nullptr) {
    const auto bt = block_tables->dimensions();
    if (bt.size() != 2 || bt[0] <= 0 || bt[1] <= 0) {
      return InvalidArgument("decode: block_tables must be [B, max_pages], got " +
                             ShapeString(bt));
    }
    p.block_tables = block_tables->typed_data();
    p.block_tables_batch = bt[0];
    p.max_pages = bt[1];
  }
  if (kv_lengths.dimensions().size() != 1) {
    return InvalidArgument("decode: kv_lengths must have rank 1");
  }
  p.kv_lengths = kv_lengths.typed_data();
  p.kv_lengths_batch = kv_lengths.element_count();
  p.scale = scale;
  p.soft_cap = soft_cap;
  p.window_left = window_left;
  if (auto e = ReadDecodeTokens(tokens, &p); e.failure()) return e;
  if (const char* message = ValidateDecodeProblem(p)) {
    return InvalidArgument(std::string("decode: ") + message);
  }
  if (!HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("decode: output shapes do not match the inputs");
  }
  if (const char* message = ValidateDecodePages(p)) {
    return InvalidArgument(std::string("paged decode: ") + message);
  }
  DecodeForward(p, DecodeResult{out->untyped_data(), lse->typed_data()}, XlaParallel(pool));
  return ffi::Error::Success();
}

ffi::Error DecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer kv_lengths, S32Buffer q_positions,
                             S32Buffer kv_positions, F32Buffer alibi_slopes,
                             ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                             float soft_cap, int64_t window_left) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, tokens, out, lse, scale,
                   soft_cap, window_left);
}

ffi::Error PagedDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                  ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                  S32Buffer block_tables, S32Buffer kv_lengths,
                                  S32Buffer q_positions, S32Buffer kv_positions,
                                  F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> out,
                                  F32Result lse, float scale, float soft_cap,
                                  int64_t window_left) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, tokens, out,
                   lse, scale, soft_cap, window_left);
}

template <typename Binding>
auto BindDecodeResults(Binding binding) {
  return std::move(binding).template Ret<ffi::AnyBuffer>()  // out
      .template Ret<ffi::Buffer<ffi::F32>>()                // lse
      .template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<int64_t>("window_left");
}

// The operands and attributes every flash target shares, in order.
template <typename Binding>
auto BindProblem(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // query
      .template Arg<ffi::AnyBuffer>()            // key
      .template Arg<ffi::AnyBuffer>()            // value
      .template Arg<ffi::AnyBuffer>()            // bias (0 elements: none)
      .template Arg<ffi::AnyBuffer>()            // mask (0 elements: none)
      .template Arg<S32Buffer>()                 // query_seq_lengths (0 elements: none)
      .template Arg<S32Buffer>();                // key_value_seq_lengths
}

// The token operands of the flash targets, after their other operands.
template <typename Binding>
auto BindTokens(Binding binding) {
  return std::move(binding).template Arg<S32Buffer>()  // query_positions (0 elements: none)
      .template Arg<S32Buffer>()                        // key_value_positions
      .template Arg<S32Buffer>()                        // query_segment_ids
      .template Arg<S32Buffer>()                        // key_value_segment_ids
      .template Arg<ffi::Buffer<ffi::F32>>();           // alibi_slopes
}

template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding).template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<bool>("is_causal")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashForwardHandler, FlashForwardImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))
                  .Ret<ffi::AnyBuffer>()    // out
                  .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashBackwardHandler, FlashBackwardImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                             .Arg<ffi::AnyBuffer>()          // out
                             .Arg<ffi::Buffer<ffi::F32>>()   // lse
                             .Arg<ffi::AnyBuffer>()          // dout
                             .Arg<ffi::Buffer<ffi::F32>>())  // dlse (0 elements: none)
                  .Ret<ffi::AnyBuffer>()             // dq
                  .Ret<ffi::AnyBuffer>()             // dk
                  .Ret<ffi::AnyBuffer>()));          // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashLogitsGradHandler, FlashLogitsGradImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                             .Arg<ffi::AnyBuffer>()          // out
                             .Arg<ffi::Buffer<ffi::F32>>()   // lse
                             .Arg<ffi::AnyBuffer>()          // dout
                             .Arg<ffi::Buffer<ffi::F32>>())  // dlse
                  .Ret<ffi::Buffer<ffi::F32>>()));   // dlogits

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseForwardHandler, SparseForwardImpl,
    BindTokens(ffi::Ffi::Bind()
                   .Ctx<ffi::ThreadPool>()
                   .Arg<ffi::AnyBuffer>()     // query
                   .Arg<ffi::AnyBuffer>()     // key
                   .Arg<ffi::AnyBuffer>()     // value
                   .Arg<S32Buffer>()          // q_indptr
                   .Arg<S32Buffer>()          // q_entries
                   .Arg<ffi::AnyBuffer>())    // masks
        .Ret<ffi::AnyBuffer>()     // out
        .Ret<ffi::Buffer<ffi::F32>>()  // lse
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseBackwardHandler, SparseBackwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()     // query
        .Arg<ffi::AnyBuffer>()     // key
        .Arg<ffi::AnyBuffer>()     // value
        .Arg<ffi::AnyBuffer>()     // out
        .Arg<ffi::Buffer<ffi::F32>>()  // lse
        .Arg<ffi::AnyBuffer>()     // dout
        .Arg<ffi::Buffer<ffi::F32>>()  // dlse (0 elements: none)
        .Arg<S32Buffer>()          // q_indptr
        .Arg<S32Buffer>()          // q_entries
        .Arg<S32Buffer>()          // k_indptr
        .Arg<S32Buffer>()          // k_entries
        .Arg<ffi::AnyBuffer>()     // masks
        .Arg<ffi::AnyBuffer>()     // masks_t (transposed)
        .Arg<S32Buffer>()          // query_positions (0 elements: none)
        .Arg<S32Buffer>()          // key_value_positions
        .Arg<S32Buffer>()          // query_segment_ids
        .Arg<S32Buffer>()          // key_value_segment_ids
        .Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes
        .Ret<ffi::AnyBuffer>()     // dq
        .Ret<ffi::AnyBuffer>()     // dk
        .Ret<ffi::AnyBuffer>()     // dv
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeForwardHandler, DecodeForwardImpl,
    BindDecodeResults(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_cache
                          .Arg<ffi::AnyBuffer>()     // value_cache
                          .Arg<S32Buffer>()          // kv_lengths
                          .Arg<S32Buffer>()          // query_positions (0 elements: none)
                          .Arg<S32Buffer>()          // key_value_positions
                          .Arg<ffi::Buffer<ffi::F32>>()));  // alibi_slopes

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedDecodeForwardHandler, PagedDecodeForwardImpl,
    BindDecodeResults(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_pages
                          .Arg<ffi::AnyBuffer>()     // value_pages
                          .Arg<S32Buffer>()          // block_tables
                          .Arg<S32Buffer>()          // kv_lengths
                          .Arg<S32Buffer>()          // query_positions (0 elements: none)
                          .Arg<S32Buffer>()          // key_value_positions
                          .Arg<ffi::Buffer<ffi::F32>>()));  // alibi_slopes

}  // namespace jaxattn

namespace jaxattn {

std::vector<FfiTarget> FfiTargets() {
  return {
      {"jaxattn_flash_fwd_v1", reinterpret_cast<void*>(FlashForwardHandler)},
      {"jaxattn_flash_bwd_v1", reinterpret_cast<void*>(FlashBackwardHandler)},
      {"jaxattn_flash_dlogits_v1", reinterpret_cast<void*>(FlashLogitsGradHandler)},
      {"jaxattn_decode_fwd_v1", reinterpret_cast<void*>(DecodeForwardHandler)},
      {"jaxattn_paged_decode_fwd_v1", reinterpret_cast<void*>(PagedDecodeForwardHandler)},
      {"jaxattn_sparse_fwd_v1", reinterpret_cast<void*>(SparseForwardHandler)},
      {"jaxattn_sparse_bwd_v1", reinterpret_cast<void*>(SparseBackwardHandler)},
  };
}

}  // namespace jaxattn

// ---------------------------------------------------------------------------------------------
// Shard views (docs/sharding.md). Under a multi-device jit, jaxattn/_sharding.py lowers every
// target so that XLA's batch partitioner can split it along batch and heads: each buffer is
// handed over in a "view" whose leading dims are the partitioned ones (a transpose with a
// layout that leaves the bytes where the kernels expect them; a broadcast along a factor the
// buffer lacks, whose first slice is the original; or a flat, replicated array). The int64
// array attribute `jaxattn_views` says how to get back the dims each handler expects. The
// trampoline below rewrites the buffer dims of the call frame (data pointers never change),
// checks that batch and heads were split consistently (whole GQA groups), strips the
// attribute and calls the handler: handlers never see views.
//
// Layout of `jaxattn_views` (format 1):
//   [1, num_args, num_rets, num_factors,
//    per factor: count, count x (buffer, view axis, global size),
//    per buffer (args, then results): rank r, r codes]
// A code >= 0 is a view axis (its local size), a code < 0 the constant -code - 1.
namespace jaxattn {
namespace {

constexpr char kViewsAttr[] = "jaxattn_views";
constexpr int64_t kMaxViewRank = 8;

XLA_FFI_Error* ViewError(const XLA_FFI_Api* api, const std::string& message) {
  const std::string text = "jaxattn: " + message;
  XLA_FFI_Error_Create_Args args;
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.extension_start = nullptr;
  args.message = text.c_str();
  args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return api->XLA_FFI_Error_Create(&args);
}

// Reads int64 values one at a time, failing (not reading past the end) on a short array.
class Reader {
 public:
  Reader(const int64_t* data, int64_t size) : data_(data), size_(size) {}
  bool Next(int64_t* value) {
    if (pos_ >= size_) return false;
    *value = data_[pos_++];
    return true;
  }
  bool done() const { return pos_ == size_; }

 private:
  const int64_t* data_;
  int64_t size_;
  int64_t pos_ = 0;
};

// Returns nullptr on success, else an error message. Fills `copies` (args, then results) with
// the frame's buffers, their dims rewritten into `dims`.
const char* ApplyViews(Reader& r, const XLA_FFI_CallFrame& frame,
                       std::vector<XLA_FFI_Buffer>& copies, std::vector<int64_t>& dims) {
  int64_t format, num_args, num_rets, num_factors;
  if (!r.Next(&format) || format != 1) return "unknown jaxattn_views format";
  if (!r.Next(&num_args) || !r.Next(&num_rets) || num_args != frame.args.size ||
      num_rets != frame.rets.size) {
    return "jaxattn_views does not match the number of operands and results";
  }
  const int64_t num_buffers = num_args + num_rets;
  std::vector<const XLA_FFI_Buffer*> views(num_buffers);
  for (int64_t i = 0; i < num_buffers; ++i) {
    const bool is_arg = i < num_args;
    const bool is_buffer = is_arg ? frame.args.types[i] == XLA_FFI_ArgType_BUFFER
                                  : frame.rets.types[i - num_args] == XLA_FFI_RetType_BUFFER;
    if (!is_buffer) return "jaxattn_views applies to buffers only";
    views[i] = static_cast<const XLA_FFI_Buffer*>(is_arg ? frame.args.args[i]
                                                         : frame.rets.rets[i - num_args]);
  }
  // Every axis split along one factor (batch, or heads) must have been cut in the same ratio:
  // otherwise, e.g., query heads and kv heads were not split in whole GQA groups.
  if (!r.Next(&num_factors) || num_factors < 0) return "bad jaxattn_views";
  for (int64_t f = 0; f < num_factors; ++f) {
    int64_t count, ref_local = 0, ref_global = 0;
    if (!r.Next(&count) || count < 0) return "bad jaxattn_views";
    for (int64_t c = 0; c < count; ++c) {
      int64_t buffer, axis, global;
      if (!r.Next(&buffer) || !r.Next(&axis) || !r.Next(&global) || buffer < 0 ||
          buffer >= num_buffers || axis < 0 || axis >= views[buffer]->rank || global < 0) {
        return "bad jaxattn_views";
      }
      const int64_t local = views[buffer]->dims[axis];
      if (c == 0) {
        ref_local = local, ref_global = global;
      } else if (local * ref_global != ref_local * global) {
        return "batch or heads were split inconsistently across operands; shard query heads "
               "and kv heads by the same mesh axes, in whole GQA groups (kv heads divisible "
               "by the number of shards)";
      }
    }
  }
  copies.resize(num_buffers);
  dims.resize(num_buffers * kMaxViewRank);
  for (int64_t i = 0; i < num_buffers; ++i) {
    const XLA_FFI_Buffer& view = *views[i];
    int64_t rank;
    if (!r.Next(&rank) || rank < 0 || rank > kMaxViewRank) return "bad jaxattn_views";
    int64_t* out = &dims[i * kMaxViewRank];
    int64_t view_elements = 1, elements = 1;
    for (int64_t a = 0; a < view.rank; ++a) view_elements *= view.dims[a];
    for (int64_t a = 0; a < rank; ++a) {
      int64_t code;
      if (!r.Next(&code)) return "bad jaxattn_views";
      if (code >= view.rank) return "bad jaxattn_views";
      out[a] = code >= 0 ? view.dims[code] : -code - 1;
      elements *= out[a];
    }
    // The handler reads a prefix of the view's memory; it may never be larger than the view.
    if (elements > view_elements) return "jaxattn_views describes more data than the buffer";
    copies[i] = view;
    copies[i].rank = rank;
    copies[i].dims = out;
  }
  if (!r.done()) return "bad jaxattn_views";
  return nullptr;
}

XLA_FFI_Error* CallWithViews(XLA_FFI_Handler* handler, XLA_FFI_CallFrame* frame) {
  // Metadata queries and other stages go to the handler untouched.
  if (frame->extension_start != nullptr || frame->stage != XLA_FFI_ExecutionStage_EXECUTE) {
    return handler(frame);
  }
  const XLA_FFI_Attrs& attrs = frame->attrs;
  int64_t found = -1;
  for (int64_t i = 0; i < attrs.size; ++i) {
    const XLA_FFI_ByteSpan* name = attrs.names[i];
    if (name->len == sizeof(kViewsAttr) - 1 &&
        std::memcmp(name->ptr, kViewsAttr, name->len) == 0) {
      found = i;
      break;
    }
  }
  if (found < 0) return handler(frame);
  const auto* array = static_cast<const XLA_FFI_Array*>(attrs.attrs[found]);
  if (attrs.types[found] != XLA_FFI_AttrType_ARRAY || array->dtype != XLA_FFI_DataType_S64) {
    return ViewError(frame->api, "jaxattn_views must be an int64 array");
  }
  Reader reader(static_cast<const int64_t*>(array->data), static_cast<int64_t>(array->size));
  std::vector<XLA_FFI_Buffer> copies;
  std::vector<int64_t> dims;
  if (const char* message = ApplyViews(reader, *frame, copies, dims)) {
    return ViewError(frame->api, message);
  }
  const int64_t num_args = frame->args.size, num_rets = frame->rets.size;
  std::vector<void*> arg_ptrs(num_args), ret_ptrs(num_rets);
  for (int64_t i = 0; i < num_args; ++i) arg_ptrs[i] = &copies[i];
  for (int64_t i = 0; i < num_rets; ++i) ret_ptrs[i] = &copies[num_args + i];
  // The same attributes without ours (they stay sorted by name).
  std::vector<XLA_FFI_AttrType> types;
  std::vector<XLA_FFI_ByteSpan*> names;
  std::vector<void*> values;
  for (int64_t i = 0; i < attrs.size; ++i) {
    if (i == found) continue;
    types.push_back(attrs.types[i]);
    names.push_back(attrs.names[i]);
    values.push_back(attrs.attrs[i]);
  }
  XLA_FFI_CallFrame inner = *frame;
  inner.args.args = arg_ptrs.data();
  inner.rets.rets = ret_ptrs.data();
  inner.attrs.size = static_cast<int64_t>(types.size());
  inner.attrs.types = types.data();
  inner.attrs.names = names.data();
  inner.attrs.attrs = values.data();
  XLA_FFI_Error* error = handler(&inner);
  frame->future = inner.future;
  return error;
}

// XLA takes plain function pointers: one trampoline per registered target.
constexpr size_t kMaxTargets = 64;
XLA_FFI_Handler* g_view_handlers[kMaxTargets];

template <size_t I>
XLA_FFI_Error* ViewTrampoline(XLA_FFI_CallFrame* frame) {
  return CallWithViews(g_view_handlers[I], frame);
}

template <size_t... I>
constexpr std::array<XLA_FFI_Handler*, sizeof...(I)> MakeTrampolines(
    std::index_sequence<I...>) {
  return {&ViewTrampoline<I>...};
}

}  // namespace

void* WithShardViews(size_t index, void* handler) {
  static constexpr auto kTrampolines = MakeTrampolines(std::make_index_sequence<kMaxTargets>());
  // Past the table a target keeps its plain handler, which rejects views (an error at run
  // time, never wrong results): raise kMaxTargets.
  if (index >= kMaxTargets) return handler;
  g_view_handlers[index] = reinterpret_cast<XLA_FFI_Handler*>(handler);
  return reinterpret_cast<void*>(kTrampolines[index]);
}

}  // namespace jaxattn
